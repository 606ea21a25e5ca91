"""The basement: helpers every room may import, which import no other mmpsa room.

Where mmpsa's configs are (:mod:`.paths`, :mod:`.package_configs`: the ``mmpsa::`` base
resolution), the lock of the installed packages (:mod:`.lock`) and the record a job writes of
what ran (:mod:`.run_record`). The programs built on the rooms above (reproduction tables,
model index, benchmarks, the GPU check) live in :mod:`mmpsa.analysis`; the user's API in
:mod:`mmpsa.apis`.
"""
