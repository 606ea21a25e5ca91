"""Reproduction tables as data: ``configs/tables/<name>.py`` read into :class:`Table` rows.

The table format is described in :mod:`mmpsa.analysis.reproduce` (which launches, gathers and
publishes them); :mod:`mmpsa.analysis.model_index` reads the paper values from here too.
"""
import os.path as osp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from mmengine.config import Config

from ..utils.paths import configs_root

_ROW_KEYS = ('psa', 'stock', 'metric', 'label', 'scale', 'checkpoint', 'cfg_options', 'paper',
             'released')
_PAPER_KEYS = ('value', 'split', 'source', 'reference')
#: Row kinds, as gather and the table name them.
TRAINED, RELEASED = 'trained here', 'released weights'


def tables_root() -> Path:
    """``configs/tables/``: one file per table."""
    return configs_root() / 'tables'


@dataclass
class Row:
    """One table row: a PSA config, its stock twin and what is measured."""

    psa: str
    stock: Optional[str]
    metric: str
    label: str
    scale: float = 1.0
    checkpoint: str = 'last'
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    paper: Optional[Dict[str, Any]] = None
    released: Optional[str] = None

    @property
    def kind(self) -> str:
        """:data:`RELEASED` (converted, tested) or :data:`TRAINED`."""
        return RELEASED if self.released else TRAINED


def _check_row(row: Dict[str, Any], where: str) -> None:
    """Raise ValueError for a row a table must not have."""
    unknown = set(row) - set(_ROW_KEYS)
    if unknown:
        raise ValueError(f'{where} has unknown keys {sorted(unknown)}')
    if row.get('checkpoint', 'last') not in ('last', 'best'):
        raise ValueError(f"{where}.checkpoint must be 'last' or 'best', got {row['checkpoint']!r}")
    paper = row.get('paper')
    if paper is not None:
        unknown = set(paper) - set(_PAPER_KEYS)
        missing = {'value', 'split', 'source'} - set(paper)
        if unknown or missing:
            raise ValueError(f'{where}.paper needs value, split, source (and may have '
                             f'reference), got {sorted(paper)}')
    released = row.get('released')
    if released is not None:
        if released not in ('psa_p', 'psa_s'):
            raise ValueError(f"{where}.released must be 'psa_p' or 'psa_s', got {released!r}")
        if row.get('stock') is not None:
            raise ValueError(f'{where}: a released-weights row has no stock twin, got '
                             f'{row["stock"]!r}')


@dataclass
class Table:
    """A reproduction table (see the module docstring)."""

    name: str
    title: str
    task: str
    dataset: str
    rows: List[Row]
    data: Optional[str] = None
    #: Environment variables of every job (the tiny table fixes the CPU threads and ISA).
    env: Dict[str, str] = field(default_factory=dict)
    attention: bool = False
    note: str = ''


def load_table(name: str) -> Table:
    """Load ``configs/tables/<name>.py`` (or a table file path).

    Args:
        name: A table name (``'tiny'``, ``'cityscapes'``, ``'coco'``) or a ``.py`` path.

    Returns:
        The table.
    """
    path = Path(name) if name.endswith('.py') else tables_root() / f'{name}.py'
    if not path.is_file():
        known = sorted(p.stem for p in tables_root().glob('*.py'))
        raise ValueError(f'table must be one of {known} or a table file, got {name!r}')
    spec = Config.fromfile(str(path)).to_dict()
    defaults = spec.get('defaults', {})
    rows = []
    for i, raw in enumerate(spec['rows']):
        row = {**defaults, **raw}
        _check_row(row, f'{path}: rows[{i}]')
        rows.append(Row(**row))
    return Table(
        name=path.stem,
        title=spec['title'],
        task=spec['task'],
        dataset=spec['dataset'],
        rows=rows,
        data=spec.get('data'),
        env={
            k: str(v)
            for k, v in spec.get('env', {}).items()
        },
        attention=spec.get('attention', False),
        note=spec.get('note', ''))


def config_name(config: str) -> str:
    """A config's name (its file stem): the name of its work dir."""
    return osp.splitext(osp.basename(config.split('::')[-1]))[0]
