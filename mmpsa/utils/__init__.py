"""The project's own helpers, not the user's API (that is :mod:`mmpsa.apis`).

As in ``mmdet.utils`` (which holds its benchmarks) and ``mmseg.utils``: the config root
(:mod:`.paths`), the library side of the maintenance tools in ``tools/`` -- block and backbone
benchmarks (:mod:`.benchmark`, :mod:`.benchmark_backbone`), ``model-index.yml`` generation
(:mod:`.model_index`), the reproduction tables and the demo (:mod:`.reproduce`) and the tiny
data (:mod:`.tiny`).
"""
