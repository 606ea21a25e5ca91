"""Library side of the command-line tools in ``tools/`` (each tool is a thin CLI)."""
