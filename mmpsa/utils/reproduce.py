"""Reproduction tables: launch every row (PSA config and its stock twin), gather, publish.

A table is data, ``configs/tables/<name>.py`` (an mmengine config file): a title, the task and
dataset, ``defaults`` for the rows, and ``rows``, each a dict with

- ``psa``: the PSA config, relative to mmpsa's config root (``'mmseg/psa_ocrnet/...py'``);
- ``stock``: its stock twin, the config it inherits, run under the same schedule
  (``'mmseg::ocrnet/...py'``, or an mmpsa config path); None for no twin;
- ``metric`` (the key in the test results, e.g. ``'mIoU'``, ``'coco/AP'``), ``label`` (the
  column name), ``scale`` (factor to percent), ``checkpoint`` (``'last'`` or ``'best'``: which
  checkpoint is tested), ``cfg_options`` (applied to both runs);
- ``paper``: ``dict(value=..., source=...)``, the paper's number, or None.

Every run goes into ``WORK_DIR/<table>/<config name>/`` (training) and its ``test/`` folder
(testing of the chosen checkpoint). The state of a run is read from those folders only, so a
second launch skips finished runs and resumes interrupted ones, and gather needs nothing else:
it reads mmengine's logs and result JSONs (no re-evaluation).
"""
import contextlib
import glob
import json
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import yaml
from mmengine.config import Config

from .paths import configs_root

#: Values of ``--launcher``: mmpsa's tools/train.py, torchrun, slurm, ``mim train``.
LAUNCHERS = ('local', 'pytorch', 'slurm', 'mim')
#: Run states, as gather reports them.
FINISHED, TRAINED, UNFINISHED, FAILED, NOT_STARTED = ('finished', 'trained, not tested',
                                                      'unfinished', 'failed', 'not started')
_ROW_KEYS = ('psa', 'stock', 'metric', 'label', 'scale', 'checkpoint', 'cfg_options', 'paper')
_LOG_TIME = re.compile(r'^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) - mmengine - ')


def tables_root() -> Path:
    """``configs/tables/``: one file per table."""
    return configs_root() / 'tables'


def tools_root() -> Path:
    """mmpsa's ``tools/`` (beside its ``configs/``: the checkout's, or ``mmpsa/.mim``'s)."""
    return configs_root().parent / 'tools'


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


@dataclass
class Table:
    """A reproduction table (see the module docstring)."""

    name: str
    title: str
    task: str
    dataset: str
    rows: List[Row]
    data: Optional[str] = None
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
        unknown = set(row) - set(_ROW_KEYS)
        if unknown:
            raise ValueError(f'{path}: rows[{i}] has unknown keys {sorted(unknown)}')
        if row.get('checkpoint', 'last') not in ('last', 'best'):
            raise ValueError(f"{path}: rows[{i}].checkpoint must be 'last' or 'best', "
                             f"got {row['checkpoint']!r}")
        rows.append(Row(**row))
    return Table(
        name=path.stem,
        title=spec['title'],
        task=spec['task'],
        dataset=spec['dataset'],
        rows=rows,
        data=spec.get('data'),
        attention=spec.get('attention', False),
        note=spec.get('note', ''))


def _shown(path: Path) -> str:
    """A path relative to the current folder when it is under it (shorter commands)."""
    rel = osp.relpath(path)
    return str(path) if rel.startswith('..') else rel


def config_file(config: str) -> str:
    """The file of a table's config: ``pkg::path`` in that package, else under mmpsa's root."""
    if '::' in config:
        from mmengine.config.utils import _get_package_and_cfg_path
        from mmengine.utils import get_installed_path
        package, rel = _get_package_and_cfg_path(config)
        return osp.join(get_installed_path(package), '.mim', 'configs', rel)
    return _shown(configs_root() / config)


def config_name(config: str) -> str:
    """A config's name (its file stem): the name of its work dir."""
    return osp.splitext(osp.basename(config.split('::')[-1]))[0]


@dataclass
class LaunchOptions:
    """How runs are launched (the launcher's own settings; see ``tools/reproduce.py``)."""

    launcher: str = 'local'
    gpus: int = 1
    nnodes: int = 1
    partition: Optional[str] = None
    gpus_per_node: Optional[int] = None
    data_root: Optional[str] = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f'launcher must be one of {LAUNCHERS}, got {self.launcher!r}')
        if self.launcher == 'slurm' and not self.partition:
            raise ValueError('launcher slurm needs a partition, got None')
        if self.gpus < 1 or self.nnodes < 1:
            raise ValueError(f'gpus and nnodes must be >= 1, got {self.gpus}, {self.nnodes}')


@dataclass
class Run:
    """One training + test of one config of a table."""

    config: str
    scope: str
    work_dir: Path
    cfg_options: Dict[str, Any]
    checkpoint: str

    @property
    def name(self) -> str:
        return config_name(self.config)

    @property
    def test_dir(self) -> Path:
        return self.work_dir / 'test'

    def exact_resume(self, launcher: str) -> bool:
        """Whether the launcher runs a train tool that honours ``runner_type``: all but
        ``mim train mmpose`` (mmpose's own tools/train.py ignores it: ordinary resume)."""
        return not (launcher == 'mim' and self.scope == 'mmpose')


@dataclass
class Command:
    """A command line and the environment variables it is run with."""

    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return ' '.join([f'{k}={shlex.quote(v)}'
                         for k, v in self.env.items()] + [shlex.quote(a) for a in self.argv])


def _scope(config: str) -> str:
    """``mmseg`` or ``mmpose`` from a config's name (package prefix or folder)."""
    head = config.split('::')[0] if '::' in config else config.split('/')[0]
    if head not in ('mmseg', 'mmpose'):
        raise ValueError(f'config must be under mmseg/ or mmpose/ (or mmseg::, mmpose::), '
                         f'got {config!r}')
    return head


def runs_of(table: Table, work_root: str, data_roots: Optional[Dict[str, str]] = None) -> List[Run]:
    """Every distinct run of a table, PSA config then stock twin, row by row.

    Args:
        table: The table.
        work_root: ``WORK_DIR``; runs go into ``WORK_DIR/<table>/<config name>/``.
        data_roots: Data folder per scope (default: the configs' own).

    Returns:
        The runs (a stock twin shared by several rows runs once).
    """
    runs: Dict[str, Run] = {}
    for row in table.rows:
        for config in (row.psa, row.stock):
            if config is None or config_name(config) in runs:
                continue
            scope = _scope(config)
            options = dict(row.cfg_options)
            if data_roots and scope in data_roots:
                options.update(data_root_options(config, data_roots[scope], row.cfg_options))
            runs[config_name(config)] = Run(config, scope,
                                            Path(work_root) / table.name / config_name(config),
                                            options, row.checkpoint)
    return list(runs.values())


def data_root_options(config: str,
                      data_root: str,
                      cfg_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``--cfg-options`` that point a config's datasets (and COCO annotation files) at a folder.

    Args:
        config: A table config.
        data_root: The data folder.
        cfg_options: Options applied before these.
    """
    from .tiny import data_root_updates
    cfg = Config.fromfile(config_file(config))
    cfg.merge_from_dict(cfg_options or {})
    return data_root_updates(cfg, data_root)


def _exact_resume_options() -> Dict[str, Any]:
    """What ``configs/_base_/psa_runtime.py`` sets (``runner_type``), as ``--cfg-options``."""
    return Config.fromfile(str(configs_root() / '_base_' / 'psa_runtime.py')).to_dict()


def _cfg_options(options: Dict[str, Any]) -> List[str]:
    if not options:
        return []
    return ['--cfg-options'] + [f'{k}={_option_value(v)}' for k, v in options.items()]


def _option_value(value: Any) -> str:
    """A value as mmengine's ``DictAction`` reads it back."""
    if isinstance(value, (list, tuple)):
        inner = ','.join(_option_value(v) for v in value)
        return f'[{inner}]' if isinstance(value, list) else f'({inner})'
    return str(value)


def train_command(run: Run, opts: LaunchOptions, resume: bool = False) -> Command:
    """The command that trains a run with the chosen launcher.

    Args:
        run: The run.
        opts: The launcher and its settings.
        resume: Resume from the latest checkpoint of the work dir.
    """
    options = dict(run.cfg_options)
    if run.exact_resume(opts.launcher):
        options.update(_exact_resume_options())
    args = ['--work-dir', str(run.work_dir)]
    if resume:  # mmseg's tool: a flag; ours and mmpose's: no value = the latest checkpoint
        args.append('--resume')
    args += _cfg_options(options)
    return _launch('train', run, opts, [config_file_for(run, opts)], args)


def test_command(run: Run, opts: LaunchOptions, checkpoint: str) -> Command:
    """The command that tests a run's checkpoint with the chosen launcher."""
    args = ['--work-dir', str(run.test_dir)] + _cfg_options(run.cfg_options)
    if opts.launcher == 'mim':
        return _launch('test', run, opts, [config_file_for(run, opts), '--checkpoint', checkpoint],
                       args)
    return _launch('test', run, opts, [config_file_for(run, opts), checkpoint], args)


def config_file_for(run: Run, opts: LaunchOptions) -> str:
    """The config argument: mmpsa's tools read ``pkg::`` names; mim gets the file."""
    if opts.launcher == 'mim' or '::' not in run.config:
        return config_file(run.config)
    return run.config


def _launch(step: str, run: Run, opts: LaunchOptions, positional: List[str],
            args: List[str]) -> Command:
    tools = Path(_shown(tools_root()))
    if opts.launcher == 'local':
        return Command([sys.executable, str(tools / f'{step}.py')] + positional + args)
    if opts.launcher == 'pytorch':
        env = {'NNODES': str(opts.nnodes)} if opts.nnodes > 1 else {}
        return Command(['bash', str(tools / f'dist_{step}.sh')] + positional + [str(opts.gpus)] +
                       args, env)
    if opts.launcher == 'slurm':
        env = {'GPUS': str(opts.gpus), 'GPUS_PER_NODE': str(opts.gpus_per_node or opts.gpus)}
        return Command(['bash', str(tools / f'slurm_{step}.sh'), opts.partition, run.name] +
                       positional + args, env)
    # mim: the codebase's own tools/train.py / test.py
    launcher = 'pytorch' if opts.gpus > 1 else 'none'
    mim = ['mim', step, run.scope] + positional + ['--gpus', str(opts.gpus)]
    if opts.partition:
        mim += ['--launcher', 'slurm', '--partition', opts.partition]
        if opts.gpus_per_node:
            mim += ['--gpus-per-node', str(opts.gpus_per_node)]
    else:
        mim += ['--launcher', launcher]
    return Command(mim + args)


def _latest(pattern: str) -> Optional[str]:
    found = sorted(glob.glob(pattern))
    return found[-1] if found else None


def checkpoint_of(run: Run, expected: bool = False) -> Optional[str]:
    """The checkpoint a run tests: the last one (``last_checkpoint``) or the best one.

    Args:
        run: The run.
        expected: Before training, return the name it will have (for ``--dry-run``).
    """
    if run.checkpoint == 'best':
        best = _latest(str(run.work_dir / 'best_*.pth'))
        return best or (str(run.work_dir / 'best_*.pth') if expected else None)
    last = run.work_dir / 'last_checkpoint'
    if last.is_file() and (run.work_dir / 'train.done').is_file():
        return last.read_text().strip()
    if not expected:
        return None
    cfg = Config.fromfile(config_file(run.config))
    cfg.merge_from_dict(run.cfg_options)
    if 'max_epochs' in cfg.train_cfg:
        return str(run.work_dir / f'epoch_{cfg.train_cfg.max_epochs}.pth')
    return str(run.work_dir / f'iter_{cfg.train_cfg.max_iters}.pth')


def test_results(run: Run) -> Optional[Dict[str, Any]]:
    """The metrics mmengine wrote for the run's latest test (``test/<time>/<time>.json``)."""
    path = _latest(str(run.test_dir / '*' / '*.json'))
    return json.loads(Path(path).read_text()) if path else None


def state(run: Run) -> str:
    """What the run's folders say: finished, trained not tested, unfinished, failed, not
    started."""
    if test_results(run) is not None:
        return FINISHED
    if (run.work_dir / 'train.done').is_file():
        return FAILED if (run.work_dir / 'test.failed').is_file() else TRAINED
    if (run.work_dir / 'train.failed').is_file():
        return FAILED
    if (run.work_dir / 'last_checkpoint').is_file() or _train_logs(run):
        return UNFINISHED  # killed, or still running
    return NOT_STARTED


def _execute(cmd: Command, log: Path) -> int:
    """Run a command with its output into ``log``; return its exit status."""
    env = dict(os.environ, **cmd.env)
    # the wrapper scripts call `python`: this interpreter's first
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'a') as out:
        out.write(f'\n$ {cmd}\n')
        out.flush()
        return subprocess.call(cmd.argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def launch(table: Table,
           work_root: str,
           opts: LaunchOptions,
           dry_run: bool = False,
           echo: Callable[[str], None] = print) -> List[Tuple[Run, str]]:
    """Train and test every run of a table that is not finished yet.

    Finished runs are skipped, unfinished ones resumed, failed ones reported (and retried on
    the next launch); one progress line per run, the full output in ``<run>/train.log.txt``
    and ``test.log.txt``.

    Args:
        table: The table.
        work_root: ``WORK_DIR``.
        opts: Launcher and its settings.
        dry_run: Print the commands instead of running them.
        echo: Where progress lines go.

    Returns:
        ``(run, state)`` of every run afterwards.
    """
    data_roots = prepare_data(table, work_root, opts, dry_run)
    runs = runs_of(table, work_root, data_roots)
    out = []
    for i, run in enumerate(runs, 1):
        head = f'[{i}/{len(runs)}] {run.name}'
        now = state(run)
        if now == FINISHED:
            echo(f'{head}: finished before, skipped')
            out.append((run, now))
            continue
        if not run.exact_resume(opts.launcher):
            echo(f'{head}: note: mim train {run.scope} ignores runner_type, so a resume there '
                 'is mmengine\'s ordinary one (no RNG states)')
        if dry_run:
            resume = now == UNFINISHED
            if not (run.work_dir / 'train.done').is_file():
                echo(f'{head}: train: {train_command(run, opts, resume)}')
            echo(f'{head}: test: {test_command(run, opts, checkpoint_of(run, expected=True))}')
            out.append((run, now))
            continue
        out.append((run, _train_and_test(run, opts, head, echo)))
    return out


def _train_and_test(run: Run, opts: LaunchOptions, head: str, echo: Callable[[str], None]) -> str:
    run.work_dir.mkdir(parents=True, exist_ok=True)
    for marker in ('train.failed', 'test.failed'):
        (run.work_dir / marker).unlink(missing_ok=True)
    if not (run.work_dir / 'train.done').is_file():  # else only the test is left (or failed)
        resume = (run.work_dir / 'last_checkpoint').is_file()
        start = time.perf_counter()
        rc = _execute(train_command(run, opts, resume), run.work_dir / 'train.log.txt')
        took = time.perf_counter() - start
        if rc != 0:
            (run.work_dir / 'train.failed').write_text(f'exit status {rc}\n')
            echo(f'{head}: training FAILED (exit status {rc}; see '
                 f'{run.work_dir / "train.log.txt"})')
            return FAILED
        (run.work_dir / 'train.done').write_text(f'{took:.1f} s\n')
        echo(f'{head}: {"resumed and " if resume else ""}trained in {took:.0f} s')
    checkpoint = checkpoint_of(run)
    rc = _execute(test_command(run, opts, str(checkpoint)), run.work_dir / 'test.log.txt')
    results = test_results(run)
    if rc != 0 or results is None:
        (run.work_dir / 'test.failed').write_text(f'exit status {rc}\n')
        echo(f'{head}: testing FAILED (exit status {rc}; see {run.work_dir / "test.log.txt"})')
        return FAILED
    shown = [(k, v) for k, v in results.items() if isinstance(v, (int, float)) and k != 'step']
    echo(f'{head}: tested {osp.basename(checkpoint)}: ' + ', '.join(f'{k} {v:.4g}'
                                                                    for k, v in shown[:3]))
    return FINISHED


def prepare_data(table: Table,
                 work_root: str,
                 opts: LaunchOptions,
                 dry_run: bool = False) -> Optional[Dict[str, str]]:
    """The data folder per scope: the generated tiny sets for a ``data='tiny'`` table (made
    once under ``WORK_DIR/data``), else ``--data-root`` for every scope, else None."""
    if table.data == 'tiny':
        from .tiny import make_tiny_data
        roots = {
            'mmseg': Path(work_root) / 'data' / 'tiny_cityscapes',
            'mmpose': Path(work_root) / 'data' / 'tiny_coco'
        }
        if not dry_run:
            for scope, root in roots.items():
                make_tiny_data(root, scope)
        return {scope: str(root) for scope, root in roots.items()}
    if opts.data_root:
        return {'mmseg': opts.data_root, 'mmpose': opts.data_root}
    return None


# ------------------------------------------------------------------ gather
def _train_logs(run: Run) -> List[Path]:
    """The text logs of a run's training sessions (one per launch), oldest first."""
    return sorted(p for p in run.work_dir.glob('*/*.log') if p.parent.name[:1].isdigit())


def train_seconds(run: Run) -> Optional[float]:
    """Training time from the logs: first to last log line of each session, summed."""
    total = 0.0
    logs = _train_logs(run)
    for log in logs:
        stamps = [m.group(1) for m in map(_LOG_TIME.match, log.read_text().splitlines()) if m]
        if len(stamps) > 1:
            first, last = (
                datetime.strptime(s, '%Y/%m/%d %H:%M:%S') for s in (stamps[0], stamps[-1]))
            total += (last - first).total_seconds()
    return total if logs else None


def peak_memory_mb(run: Run) -> Optional[float]:
    """The largest ``memory`` (MB; logged on GPUs only) of the training logs, or None."""
    peak = None
    for path in run.work_dir.glob('*/vis_data/scalars.json'):
        for line in path.read_text().splitlines():
            value = json.loads(line).get('memory')
            if value is not None:
                peak = value if peak is None else max(peak, value)
    return peak


def complexity_of(run: Run, stock: Optional[Run]) -> Dict[str, Any]:
    """Params and (fused) FLOPs of a row's PSA model, and its stock twin's params.

    From the PSA config's entry in mmpsa's metafiles where it has one (a test keeps those equal
    to the models'; full-size models take minutes to analyse on a CPU), else measured with
    :func:`mmpsa.apis.complexity.measure` once and kept in the run dir.
    """
    from .model_index import metafile_metadata
    md = metafile_metadata(run.name)
    if md is not None:
        return {
            'params': round(md['Parameters (M)'] * 1e6),
            'flops': round(md['FLOPs fused (G)'] * 1e9),
            'input': [int(side) for side in md['Input'].split('x')],
            'stock_params': round(md['Stock Parameters (M)'] * 1e6),
        }
    cache = run.work_dir / 'complexity.json'
    if cache.is_file():
        return json.loads(cache.read_text())
    from mmpsa.apis.complexity import measure
    with _quiet_stock_libraries():
        cost = measure(Config.fromfile(config_file(run.config)))
        stock_cost = measure(Config.fromfile(config_file(stock.config))) if stock else None
    record = {
        'params': cost.params,
        'flops': cost.flops,
        'input': list(cost.input_shape[1:]),
        'stock_params': stock_cost.params if stock_cost else None,
    }
    run.work_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record))
    return record


def stock_metafile_value(stock: Optional[str], metric: str) -> Optional[float]:
    """The stock config's result as mmseg's/mmpose's own metafile gives it (or None)."""
    if stock is None or '::' not in stock:
        return None
    folder = osp.dirname(config_file(stock))
    name = config_name(stock)
    key = metric.split('/')[-1]
    for path in sorted(glob.glob(osp.join(folder, '*.y*ml'))):
        content = yaml.safe_load(Path(path).read_text()) or {}
        for model in content.get('Models', []) if isinstance(content, dict) else []:
            if model.get('Name') == name or config_name(str(model.get('Config', ''))) == name:
                results = model.get('Results') or []
                for result in [results] if isinstance(results, dict) else results:
                    if key in (result.get('Metrics') or {}):
                        return float(result['Metrics'][key])
    return None


def _scaled(value: Optional[float], scale: float) -> Optional[float]:
    return None if value is None else round(value * scale, 2)


def _metric(run: Optional[Run], row: Row) -> Tuple[str, Optional[float]]:
    if run is None:
        return 'no twin', None
    now = state(run)
    if now != FINISHED:
        return now, None
    results = test_results(run)
    if row.metric not in results:
        return f'no {row.metric!r} in the test results', None
    return FINISHED, _scaled(float(results[row.metric]), row.scale)


def gather(table: Table, work_root: str) -> List[Dict[str, Any]]:
    """Read the finished runs of a table into one record per row (no re-evaluation).

    Args:
        table: The table.
        work_root: ``WORK_DIR`` of the launch.

    Returns:
        The rows: config, params/FLOPs, PSA and stock metrics measured here (None where the
        run did not finish; ``psa_state``/``stock_state`` say why), Δ, the stock metafile's and
        the paper's values, train time, peak memory, log and checkpoint paths.
    """
    runs = {r.name: r for r in runs_of(table, work_root)}
    records = []
    for row in table.rows:
        psa = runs[config_name(row.psa)]
        stock = runs[config_name(row.stock)] if row.stock else None
        psa_state, psa_value = _metric(psa, row)
        stock_state, stock_value = _metric(stock, row)
        cost = complexity_of(psa, stock)
        logs = _train_logs(psa)
        records.append({
            'config':
            psa.name,
            'stock_config':
            stock.name if stock else None,
            'metric':
            row.label,
            'params':
            cost['params'],
            'flops':
            cost['flops'],
            'input':
            cost['input'],
            'stock_params':
            cost['stock_params'],
            'psa':
            psa_value,
            'psa_state':
            psa_state,
            'stock':
            stock_value,
            'stock_state':
            stock_state,
            'delta':
            (round(psa_value -
                   stock_value, 2) if psa_value is not None and stock_value is not None else None),
            'stock_metafile':
            _scaled(stock_metafile_value(row.stock, row.metric), row.scale),
            'paper': (row.paper or {}).get('value'),
            'paper_source': (row.paper or {}).get('source'),
            'train_s':
            train_seconds(psa),
            'memory_mb':
            peak_memory_mb(psa),
            'log':
            str(logs[-1]) if logs else None,
            'checkpoint':
            checkpoint_of(psa) if psa_state == FINISHED else None,
        })
    return records


def _cell(value: Any, state_: str = FINISHED, fmt: str = '{}') -> str:
    if value is None:
        return state_ if state_ != FINISHED else 'n/a'
    return fmt.format(value)


def format_table(table: Table, records: List[Dict[str, Any]], base: Optional[Path] = None) -> str:
    """The gathered table in Markdown (links relative to ``base``)."""

    def link(path: Optional[str], text: str) -> str:
        if path is None:
            return ''
        return f'[{text}]({osp.relpath(path, base) if base else path})'

    lines = [
        '| config | input | params (M) PSA / stock | GFLOPs | metric | stock (here) '
        '| PSA (here) | Δ | stock (metafile) | paper | train time | peak memory | files |',
        '|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|',
    ]
    for r in records:
        digits = '{:.2f}' if r['params'] >= 1e7 else '{:.3f}'  # the metafiles' precision
        stock_params = _cell(r['stock_params'] and r['stock_params'] / 1e6, 'n/a', digits)
        lines.append(' | '.join([
            f'| {r["config"]}', 'x'.join(map(
                str, r['input'])), f'{digits.format(r["params"] / 1e6)} / {stock_params}',
            f'{r["flops"] / 1e9:.4g}', r['metric'],
            _cell(r['stock'], r['stock_state'], '{:.2f}'),
            _cell(r['psa'], r['psa_state'], '{:.2f}'),
            _cell(r['delta'], 'n/a', '{:+.2f}'),
            _cell(r['stock_metafile'], 'n/a'),
            _cell(r['paper'], 'n/a'),
            _cell(r['train_s'], 'n/a', '{:.0f} s'),
            _cell(r['memory_mb'], 'n/a', '{:.0f} MB'), ' '.join(
                filter(None, [link(r['log'], 'log'),
                              link(r['checkpoint'], 'checkpoint')]))
        ]) + ' |')
    return '\n'.join(lines)


def write_results(table: Table, work_root: str, records: List[Dict[str, Any]]) -> Tuple[Path, Path]:
    """Write ``WORK_DIR/<table>/results.md`` and ``results.json``."""
    folder = Path(work_root) / table.name
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / 'results.md'
    md.write_text(f'# {table.title}\n\n{format_table(table, records, folder)}\n' +
                  (f'\n{table.note}\n' if table.note else ''))
    js = folder / 'results.json'
    js.write_text(
        json.dumps({
            'table': table.name,
            'title': table.title,
            'rows': records
        }, indent=2))
    return md, js


# ------------------------------------------------------------------ publish
def publish(table: Table,
            work_root: str,
            opts: Optional[LaunchOptions] = None,
            weights_url: Optional[str] = None) -> List[str]:
    """Write the measured results of a gathered table into the PSA configs' metafile entries.

    Only what was measured goes in: ``Results`` (task, dataset, the metric), ``Weights``
    (the tested checkpoint, under ``weights_url`` when given), ``Training log``, and in
    ``Metadata`` the ``Training Resources`` (from the launch options) and ``Memory (MB)`` (where
    the logs have it). Rows that did not finish, and configs without a metafile entry (the
    tiny ones), are left out.

    Args:
        table: The table.
        work_root: ``WORK_DIR`` of the launch.
        opts: The launch options (their GPU count is the training resources).
        weights_url: Prefix under which the checkpoints are uploaded (default: local paths).

    Returns:
        The names of the models written.
    """
    from .model_index import update_models
    updates = {}
    for rec in gather(table, work_root):
        if rec['psa'] is None:
            continue
        weights = rec['checkpoint']
        if weights_url:
            weights = f'{weights_url.rstrip("/")}/{rec["config"]}/{osp.basename(weights)}'
        metadata = {}
        if opts is not None:
            metadata['Training Resources'] = f'{opts.gpus * opts.nnodes}x GPUs'
        if rec['memory_mb'] is not None:
            metadata['Memory (MB)'] = rec['memory_mb']
        updates[rec['config']] = {
            'Results': [{
                'Task': table.task,
                'Dataset': table.dataset,
                'Metrics': {
                    rec['metric']: rec['psa']
                }
            }],
            'Weights':
            weights,
            'Training log':
            rec['log'],
            'Metadata':
            metadata,
        }
    return update_models(updates)


# ------------------------------------------------------------------ the whole job
@contextlib.contextmanager
def _quiet_stock_libraries() -> Iterator[None]:
    """Hide the notes the stock libraries print on every model build (mmseg's and mmpose's
    deprecations), which would bury the progress lines; mmpsa's own warnings still show."""
    with warnings.catch_warnings():
        for library in ('mmseg', 'mmpose', 'mmdet', 'mmengine', 'mmcv'):
            warnings.filterwarnings('ignore', module=library)
        yield


def attention_pictures(table: Table, work_root: str, per_model: int = 2) -> List[str]:
    """The attention maps of every finished PSA run on its first validation images.

    Args:
        table: The table.
        work_root: ``WORK_DIR``.
        per_model: Images per model.

    Returns:
        The written PNGs (under ``WORK_DIR/<table>/attention/<config name>/``).
    """
    from mmpsa.apis.attention import visualize_attention
    data_roots = prepare_data(table, work_root, LaunchOptions(), dry_run=True) or {}
    runs = {r.name: r for r in runs_of(table, work_root, data_roots)}
    pictures = []
    for row in table.rows:
        run = runs[config_name(row.psa)]
        if state(run) != FINISHED or run.scope not in data_roots:
            continue
        cfg = Config.fromfile(config_file(run.config))
        cfg.merge_from_dict(run.cfg_options)
        root = Path(data_roots[run.scope])
        if run.scope == 'mmseg':
            images = sorted((root / 'leftImg8bit' / 'val').rglob('*.png'))[:per_model]
        else:
            images = sorted((root / 'val2017').glob('*.jpg'))[:per_model]
        out = Path(work_root) / table.name / 'attention' / run.name
        with _quiet_stock_libraries():
            pictures += visualize_attention(cfg, checkpoint_of(run), [str(p) for p in images],
                                            str(out))
    return pictures


def reproduce(name: str,
              steps: Tuple[str, ...] = ('launch', 'gather'),
              work_root: str = 'work_dirs/reproduce',
              opts: Optional[LaunchOptions] = None,
              dry_run: bool = False,
              weights_url: Optional[str] = None,
              echo: Callable[[str], None] = print) -> Optional[List[Dict[str, Any]]]:
    """``tools/reproduce.py``: launch, gather (and the attention pictures of a table that asks
    for them), publish.

    Args:
        name: The table (see :func:`load_table`).
        steps: Any of ``'launch'``, ``'gather'``, ``'publish'``, in that order.
        work_root: ``WORK_DIR``.
        opts: Launcher and its settings (default: local).
        dry_run: Print the launch commands only.
        weights_url: See :func:`publish`.
        echo: Where the progress lines and the table go.

    Returns:
        The gathered rows (None when not gathered).
    """
    unknown = set(steps) - {'launch', 'gather', 'publish'}
    if unknown:
        raise ValueError(f'steps must be launch, gather or publish, got {sorted(unknown)}')
    table = load_table(name)
    opts = opts or LaunchOptions()
    if 'launch' in steps:
        launch(table, work_root, opts, dry_run, echo)
        if dry_run:
            return None
    records = None
    if 'gather' in steps:
        records = gather(table, work_root)
        md, js = write_results(table, work_root, records)
        pictures = attention_pictures(table, work_root) if table.attention else []
        echo(f'\n{format_table(table, records)}\n\nTable: {md} (and {js.name}); logs and '
             f'checkpoints: {Path(work_root) / table.name}/<config>/' +
             (f'; attention maps: {len(pictures)} PNGs in {Path(work_root) / table.name}/'
              'attention/' if table.attention else ''))
    if 'publish' in steps:
        names = publish(table, work_root, opts, weights_url)
        echo(f'published {len(names)} models into their metafiles: {", ".join(names) or "-"}')
    return records
