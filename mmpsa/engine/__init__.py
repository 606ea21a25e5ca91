"""Runtime pieces registered in mmengine's root registries."""
