"""The top floor: programs built on every other room, imported by ``tools/`` only.

- :mod:`.tables`: the reproduction tables as data (``configs/tables/*.py``);
- :mod:`.reproduce`: launch a table's runs, gather, publish, the demo's self-check;
- :mod:`.model_index`: ``model-index.yml`` and the metafiles;
- :mod:`.benchmark`, :mod:`.benchmark_backbone`: the block and HRNet-W48 step benchmarks;
- :mod:`.gpu_check`: the GPU check (torch, triton and timm only).

Nothing in ``mmpsa`` imports this package; importing it registers nothing.
"""
