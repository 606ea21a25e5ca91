"""Where mmpsa's configs are: the one place that computes it."""
from pathlib import Path


def configs_root() -> Path:
    """The ``configs/`` folder of mmpsa (a source checkout or an editable install).

    Returns:
        The folder holding ``_base_/``, ``mmseg/`` and ``mmpose/``.
    """
    return Path(__file__).resolve().parents[2] / 'configs'
