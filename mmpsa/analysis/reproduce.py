"""Reproduction tables: launch every row (PSA config and its stock twin), gather, publish.

A table is data, ``configs/tables/<name>.py`` (an mmengine config file): a title, the task and
dataset, ``defaults`` for the rows, and ``rows``, each a dict with

- ``psa``: the PSA config, relative to mmpsa's config root (``'mmseg/psa_ocrnet/...py'``);
- ``stock``: its stock twin, the config it inherits, run under the same schedule
  (``'mmseg::ocrnet/...py'``, or an mmpsa config path); None for no twin;
- ``metric`` (the key in the test results, e.g. ``'mIoU'``, ``'coco/AP'``), ``label`` (the
  column name), ``scale`` (factor to percent), ``checkpoint`` (``'last'`` or ``'best'``: which
  checkpoint is tested), ``cfg_options`` (applied to both runs);
- ``paper``: the paper's number, or None: ``dict(value=..., split=..., source=...)``, the
  split it was measured on (``'val'``, or ``'split not stated by the source'``) and where it
  is given; with ``reference='released recipe'`` (a label) the value is not this config's
  result but that of another network or recipe, shown as a labelled reference only;
- ``released``: ``'psa_p'`` or ``'psa_s'`` for a row of the released weights: nothing is
  trained, the converter turns the released checkpoint the user gives
  (``--released psa_p=FILE``) into an mmseg checkpoint, which is tested (no stock twin).

Every run goes into ``WORK_DIR/<table>/<config name>/`` (training) and its ``test/`` folder
(testing of the chosen checkpoint). The state of a run is read from those folders only, so a
second launch skips finished runs and resumes interrupted ones, and gather needs nothing else:
it reads mmengine's logs and result JSONs (no re-evaluation), and the record each job writes
of what ran (:mod:`mmpsa.utils.run_record`: launcher, world size, GPUs, versions, commit).
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

from ..checkpoint.build import scope_of
from ..utils.paths import configs_root
from .tables import TRAINED  # noqa: F401  (re-exported: the row kinds beside RELEASED)
from .tables import RELEASED, Row, Table, config_name, load_table, tables_root

#: Values of ``--launcher``: mmpsa's tools/train.py, torchrun, slurm, ``mim train``.
LAUNCHERS = ('local', 'pytorch', 'slurm', 'mim')
#: Run states, as gather reports them.
FINISHED, TRAINED_UNTESTED, UNFINISHED, FAILED, NOT_STARTED = ('finished', 'trained, not tested',
                                                               'unfinished', 'failed',
                                                               'not started')
_LOG_TIME = re.compile(r'^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) - mmengine - ')


def tools_root() -> Path:
    """mmpsa's ``tools/`` (beside its ``configs/``: the checkout's, or ``mmpsa/.mim``'s)."""
    return configs_root().parent / 'tools'


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


@dataclass
class LaunchOptions:
    """How runs are launched (the launcher's own settings; see ``tools/reproduce.py``)."""

    launcher: str = 'local'
    gpus: int = 1
    nnodes: int = 1
    partition: Optional[str] = None
    gpus_per_node: Optional[int] = None
    data_root: Optional[str] = None
    #: The released checkpoints the user gives, by variant (``{'psa_p': 'FILE'}``).
    released: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f'launcher must be one of {LAUNCHERS}, got {self.launcher!r}')
        if self.launcher == 'slurm' and not self.partition:
            raise ValueError('launcher slurm needs a partition, got None')
        if self.gpus < 1 or self.nnodes < 1:
            raise ValueError(f'gpus and nnodes must be >= 1, got {self.gpus}, {self.nnodes}')
        unknown = set(self.released) - {'psa_p', 'psa_s'}
        if unknown:
            raise ValueError(
                f'released weights are psa_p=FILE or psa_s=FILE, got {sorted(unknown)}')


@dataclass
class Run:
    """One training + test of one config of a table."""

    config: str
    scope: str
    work_dir: Path
    cfg_options: Dict[str, Any]
    checkpoint: str
    released: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)

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
            scope = scope_of(config_file(config))
            options = dict(row.cfg_options)
            if data_roots and scope in data_roots:
                options.update(data_root_options(config, data_roots[scope], row.cfg_options))
            runs[config_name(config)] = Run(config, scope,
                                            Path(work_root) / table.name / config_name(config),
                                            options, row.checkpoint,
                                            row.released if config == row.psa else None,
                                            dict(table.env))
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
    from ..datasets.tiny import data_root_updates
    cfg = Config.fromfile(config_file(config))
    cfg.merge_from_dict(cfg_options or {})
    return data_root_updates(cfg, data_root)


def _exact_resume_options() -> Dict[str, Any]:
    """What ``configs/_base_/psa_runtime.py`` sets (``runner_type``), as ``--cfg-options``."""
    return Config.fromfile(str(configs_root() / '_base_' / 'psa_runtime.py')).to_dict()


def _record_options() -> Dict[str, Any]:
    """The run record hook (:mod:`mmpsa.utils.run_record`), as ``--cfg-options``: a new key of
    ``default_hooks``, which mmengine merges into its defaults (no ``custom_hooks`` replaced)."""
    from ..utils.run_record import HOOK_TYPE
    return {'default_hooks.run_record.type': HOOK_TYPE}


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
    if run.released:
        return convert_command(run, opts)
    options = dict(run.cfg_options)
    if run.exact_resume(opts.launcher):
        options.update(_exact_resume_options())
    options.update(_record_options())
    args = ['--work-dir', str(run.work_dir)]
    if resume:  # mmseg's tool: a flag; ours and mmpose's: no value = the latest checkpoint
        args.append('--resume')
    args += _cfg_options(options)
    return _launch('train', run, opts, [config_file_for(run, opts)], args)


def test_command(run: Run, opts: LaunchOptions, checkpoint: str) -> Command:
    """The command that tests a run's checkpoint with the chosen launcher."""
    args = ['--work-dir', str(run.test_dir)] + _cfg_options({
        **run.cfg_options,
        **_record_options()
    })
    if opts.launcher == 'mim':
        return _launch('test', run, opts, [config_file_for(run, opts), '--checkpoint', checkpoint],
                       args)
    return _launch('test', run, opts, [config_file_for(run, opts), checkpoint], args)


def released_source(run: Run, opts: LaunchOptions) -> Optional[str]:
    """The released checkpoint the user gave for a released-weights run, or None."""
    return opts.released.get(run.released) if run.released else None


def convert_command(run: Run, opts: LaunchOptions) -> Command:
    """The converter on the released checkpoint of a released-weights run (one process, on
    the machine that launches: it only maps keys), written as ``<run>/converted.pth``."""
    tools = Path(_shown(tools_root()))
    src = released_source(run, opts) or f'RELEASED_{run.released.upper()}.pth'
    return Command([
        sys.executable,
        str(tools / 'model_converters' / 'psa_official_to_mmseg.py'), src,
        str(run.work_dir / 'converted.pth'), '--config',
        config_file(run.config)
    ])


def config_file_for(run: Run, opts: LaunchOptions) -> str:
    """The config argument: mmpsa's tools read ``pkg::`` names; mim gets the file."""
    if opts.launcher == 'mim' or '::' not in run.config:
        return config_file(run.config)
    return run.config


def _launch(step: str, run: Run, opts: LaunchOptions, positional: List[str],
            args: List[str]) -> Command:
    tools = Path(_shown(tools_root()))
    if opts.launcher == 'local':
        return Command([sys.executable, str(tools / f'{step}.py')] + positional + args,
                       dict(run.env))
    if opts.launcher == 'pytorch':
        env = {'NNODES': str(opts.nnodes)} if opts.nnodes > 1 else {}
        return Command(['bash', str(tools / f'dist_{step}.sh')] + positional + [str(opts.gpus)] +
                       args, {
                           **run.env,
                           **env
                       })
    if opts.launcher == 'slurm':
        env = {'GPUS': str(opts.gpus), 'GPUS_PER_NODE': str(opts.gpus_per_node or opts.gpus)}
        return Command(['bash', str(tools / f'slurm_{step}.sh'), opts.partition, run.name] +
                       positional + args, {
                           **run.env,
                           **env
                       })
    # mim: the codebase's own tools/train.py / test.py
    launcher = 'pytorch' if opts.gpus > 1 else 'none'
    mim = ['mim', step, run.scope] + positional + ['--gpus', str(opts.gpus)]
    if opts.partition:
        mim += ['--launcher', 'slurm', '--partition', opts.partition]
        if opts.gpus_per_node:
            mim += ['--gpus-per-node', str(opts.gpus_per_node)]
    else:
        mim += ['--launcher', launcher]
    return Command(mim + args, dict(run.env))


def _latest(pattern: str) -> Optional[str]:
    found = sorted(glob.glob(pattern))
    return found[-1] if found else None


def checkpoint_of(run: Run, expected: bool = False) -> Optional[str]:
    """The checkpoint a run tests: the last one (``last_checkpoint``) or the best one.

    Args:
        run: The run.
        expected: Before training, return the name it will have (for ``--dry-run``).
    """
    if run.released:
        done = (run.work_dir / 'train.done').is_file()
        return str(run.work_dir / 'converted.pth') if done or expected else None
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
    found = sorted(p for p in run.test_dir.glob('*/*.json') if p.stem == p.parent.name)
    path = found[-1] if found else None
    return json.loads(Path(path).read_text()) if path else None


def state(run: Run) -> str:
    """What the run's folders say: finished, trained not tested, unfinished, failed, not
    started."""
    if test_results(run) is not None:
        return FINISHED
    if (run.work_dir / 'train.done').is_file():
        return FAILED if (run.work_dir / 'test.failed').is_file() else TRAINED_UNTESTED
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
        if run.released and not released_source(run, opts):
            from mmpsa.seg.released import RELEASED_WEIGHTS
            echo(f'{head}: released weights not given: download them from '
                 f'{RELEASED_WEIGHTS[run.released]} and add --released {run.released}=FILE')
            if not dry_run:
                out.append((run, now))
                continue
        elif not run.released and not run.exact_resume(opts.launcher):
            echo(f'{head}: note: mim train {run.scope} ignores runner_type, so a resume there '
                 'is mmengine\'s ordinary one (no RNG states)')
        if dry_run:
            resume = now == UNFINISHED
            if not (run.work_dir / 'train.done').is_file():
                step = 'convert' if run.released else 'train'
                echo(f'{head}: {step}: {train_command(run, opts, resume)}')
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
        resume = not run.released and (run.work_dir / 'last_checkpoint').is_file()
        start = time.perf_counter()
        log = run.work_dir / ('convert.log.txt' if run.released else 'train.log.txt')
        rc = _execute(train_command(run, opts, resume), log)
        took = time.perf_counter() - start
        step = 'converting the released weights' if run.released else 'training'
        if rc != 0:
            (run.work_dir / 'train.failed').write_text(f'exit status {rc}\n')
            echo(f'{head}: {step} FAILED (exit status {rc}; see {log})')
            return FAILED
        (run.work_dir / 'train.done').write_text(f'{took:.1f} s\n')
        done = 'converted' if run.released else 'resumed and trained' if resume else 'trained'
        echo(f'{head}: {done} in {took:.0f} s')
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
        from ..datasets.tiny import make_tiny_data
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


def run_records(run: Optional[Run]) -> Dict[str, List[Dict[str, Any]]]:
    """The records the jobs of a run wrote (:mod:`mmpsa.utils.run_record`): ``'train'`` (one
    per training session, oldest first) and ``'test'`` (one per test)."""
    from ..utils.run_record import read_records
    if run is None:
        return {'train': [], 'test': []}
    return {
        'train': read_records(run.work_dir),
        'test': read_records(run.test_dir),
    }


def _ran_on(records: Dict[str, List[Dict[str, Any]]]) -> Optional[str]:
    """What the training sessions (or, for released weights, the last test) ran on."""
    from ..utils.run_record import resources
    sessions = records['train'] or records['test'][-1:]
    found = list(dict.fromkeys(resources(r) for r in sessions))
    return ' + '.join(found) if found else None


def gather(table: Table, work_root: str) -> List[Dict[str, Any]]:
    """Read the finished runs of a table into one record per row (no re-evaluation).

    Args:
        table: The table.
        work_root: ``WORK_DIR`` of the launch.

    Returns:
        The rows: config, kind (trained here / released weights), params/FLOPs, PSA and stock
        metrics measured here (None where the run did not finish; ``psa_state``/``stock_state``
        say why), Δ, the stock metafile's and the paper's values (with split, source and a
        reference label), train time, peak memory, what it ran on and the run records of the
        PSA config's jobs, log and checkpoint paths.
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
        paper = row.paper or {}
        recorded = run_records(psa)
        records.append({
            'config':
            psa.name,
            'stock_config':
            stock.name if stock else None,
            'kind':
            row.kind,
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
            'paper':
            paper.get('value'),
            'paper_split':
            paper.get('split'),
            'paper_reference':
            paper.get('reference'),
            'paper_source':
            paper.get('source'),
            'train_s':
            train_seconds(psa),
            'memory_mb':
            peak_memory_mb(psa),
            'ran_on':
            _ran_on(recorded),
            'records':
            recorded,
            'log':
            str(logs[-1]) if logs else None,
            'checkpoint':
            checkpoint_of(psa) if psa_state == FINISHED else None,
        })
    return records


def environment(table: Table, work_root: str) -> Dict[str, Any]:
    """What every job of a table's runs recorded, merged: each field with its one value, or
    the list of distinct values where the jobs differ (None: no job recorded it)."""
    fields: Dict[str, list] = {}
    for run in runs_of(table, work_root):
        recorded = run_records(run)
        for record in recorded['train'] + recorded['test']:
            for key in ('versions', 'mmpsa_commit', 'packages_hash', 'machine', 'launcher'):
                value = record.get(key)
                if value not in fields.setdefault(key, []):
                    fields[key].append(value)
            shown = _ran_on({'train': [record], 'test': []})
            if shown not in fields.setdefault('ran_on', []):
                fields['ran_on'].append(shown)
    return {k: (v[0] if len(v) == 1 else v) for k, v in fields.items()}


def _cell(value: Any, state_: str = FINISHED, fmt: str = '{}') -> str:
    if value is None:
        return state_ if state_ != FINISHED else 'n/a'
    return fmt.format(value)


def paper_cell(record: Dict[str, Any]) -> str:
    """The paper column: ``86.95 (val)``; a reference: ``ref. 86.95 (val; released recipe)``;
    ``78.9 (split not stated by the source)``; ``n/a``."""
    if record.get('paper') is None:
        return 'n/a'
    split = record.get('paper_split') or 'split not stated'
    if record.get('paper_reference'):
        return f'ref. {record["paper"]} ({split}; {record["paper_reference"]})'
    return f'{record["paper"]} ({split})'


def format_table(table: Table,
                 records: List[Dict[str, Any]],
                 base: Optional[Path] = None,
                 links: bool = True) -> str:
    """The gathered table in Markdown.

    Args:
        table: The table.
        records: :func:`gather`'s rows (or those of a results JSON).
        base: Folder the log and checkpoint links are relative to.
        links: With the column of log and checkpoint links (the README's tables have none:
            the files are on the machine that ran).
    """

    def link(path: Optional[str], text: str) -> str:
        if path is None:
            return ''
        return f'[{text}]({osp.relpath(path, base) if base else path})'

    head = ('| config | input | params (M) PSA / stock | GFLOPs | metric | stock (here) '
            '| PSA (here) | Δ | stock (metafile) | paper | train time | peak memory | ran on |')
    rule = '|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|'
    lines = [head + (' files |' if links else ''), rule + ('---|' if links else '')]
    for r in records:
        digits = '{:.2f}' if r['params'] >= 1e7 else '{:.3f}'  # the metafiles' precision
        stock_params = _cell(r['stock_params'] and r['stock_params'] / 1e6, 'n/a', digits)
        name = r['config'] + (' (released weights)' if r.get('kind') == RELEASED else '')
        cells = [
            f'| {name}', 'x'.join(map(str, r['input'])),
            f'{digits.format(r["params"] / 1e6)} / {stock_params}', f'{r["flops"] / 1e9:.4g}',
            r['metric'],
            _cell(r['stock'], r['stock_state'], '{:.2f}'),
            _cell(r['psa'], r['psa_state'], '{:.2f}'),
            _cell(r['delta'], 'n/a', '{:+.2f}'),
            _cell(r['stock_metafile'], 'n/a'),
            paper_cell(r),
            _cell(r['train_s'], 'n/a', '{:.0f} s'),
            _cell(r['memory_mb'], 'n/a', '{:.0f} MB'),
            _cell(r.get('ran_on'), 'n/a')
        ]
        if links:
            cells.append(' '.join(
                filter(None, [link(r['log'], 'log'),
                              link(r['checkpoint'], 'checkpoint')])))
        lines.append(' | '.join(cells) + ' |')
    return '\n'.join(lines)


def write_results(table: Table, work_root: str, records: List[Dict[str, Any]]) -> Tuple[Path, Path]:
    """Write ``WORK_DIR/<table>/results.md`` and ``results.json`` (the rows, and what the jobs
    recorded of the machine, versions, commit and installed package set)."""
    folder = Path(work_root) / table.name
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / 'results.md'
    md.write_text(f'# {table.title}\n\n{format_table(table, records, folder)}\n' +
                  (f'\n{table.note}\n' if table.note else ''))
    js = folder / 'results.json'
    js.write_text(
        json.dumps(
            {
                'table': table.name,
                'title': table.title,
                'environment': environment(table, work_root),
                'rows': records
            },
            indent=2) + '\n')
    return md, js


# ------------------------------------------------------------------ README tables
def results_file(table: Table) -> Path:
    """The committed results JSON of a table: ``configs/tables/results/<table>.json``."""
    return tables_root() / 'results' / f'{table.name}.json'


def _markers(name: str) -> Tuple[str, str]:
    begin = (f'<!-- reproduce:{name} begin: generated by `python tools/reproduce.py {name} gather '
             f'--into README.md` from configs/tables/results/{name}.json; do not edit -->')
    return begin, f'<!-- reproduce:{name} end -->'


def _one(value: Any, fmt: Callable[[Any], str]) -> str:
    """A merged environment field (one value, or the list of the jobs' distinct values)."""
    values = value if isinstance(value, list) else [value]
    return ' / '.join(fmt(v) for v in values if v is not None) or 'n/a'


def environment_line(env: Dict[str, Any]) -> str:
    """One sentence of what a results JSON's jobs recorded (machine, versions, commit,
    installed package set)."""
    if not env.get('packages_hash'):
        return 'No run recorded: nothing was trained or tested for this table.'

    def machine(m: Dict[str, Any]) -> str:
        return f'{m["system"]} {m["machine"]}, {m["cpus"]} CPUs, Python {m["python"]}'

    def versions(v: Dict[str, Any]) -> str:
        names = [('torch', 'torch'), ('mmcv', 'mmcv'), ('mmengine', 'mmengine'),
                 ('mmsegmentation', 'mmseg'), ('mmpose', 'mmpose'), ('mmpsa', 'mmpsa')]
        return ', '.join(f'{shown} {v[dist]}' for dist, shown in names if v.get(dist))

    return (f'Ran on {_one(env.get("ran_on"), str)} ({_one(env.get("machine"), machine)}); '
            f'{_one(env.get("versions"), versions)}; mmpsa commit '
            f'{_one(env.get("mmpsa_commit"), str)}; installed packages '
            f'{_one(env.get("packages_hash"), str)} (the lock\'s hash when they match it).')


def readme_block(table: Table, results: Dict[str, Any]) -> str:
    """The Markdown block of a table in the README, from its results JSON (markers
    included): the title, what ran, the table without links, the measured spread if any."""
    begin, end = _markers(table.name)
    lines = [
        begin, f'**{results["title"]}** (`configs/tables/{table.name}.py`). '
        f'{environment_line(results.get("environment", {}))}', '',
        format_table(table, results['rows'], links=False)
    ]
    if results.get('spread'):
        lines += ['', spread_line(results['spread'])]
    return '\n'.join(lines + [end])


def spread_line(spread: Dict[str, Any]) -> str:
    """The sentence of a results JSON's ``spread`` (metrics over several seeds)."""
    per_row = ', '.join(f'{name} {value:.2f}' for name, value in spread['rows'].items())
    return (f'Spread over seeds {", ".join(map(str, spread["seeds"]))} (max - min of each '
            f'metric, {spread["what"]}): {per_row}. Differences within it are noise.')


def write_into(path: str, table: Table, results: Dict[str, Any]) -> None:
    """Replace a table's block (between its marker comments) in a Markdown file.

    Raises:
        ValueError: The file does not hold the markers once each.
    """
    text = Path(path).read_text()
    begin, end = _markers(table.name)
    head = begin.split(':', 2)[0] + ':' + table.name + ' begin'
    if text.count(head) != 1 or text.count(end) != 1:
        raise ValueError(f'{path} must hold the lines {begin!r} and {end!r} once each')
    start = text.index(head)
    start = text.rfind('\n', 0, start) + 1
    stop = text.index(end) + len(end)
    Path(path).write_text(text[:start] + readme_block(table, results) + text[stop:])


def readme_results(table: Table, path: str) -> str:
    """A table's block as it is in a Markdown file (markers included)."""
    text = Path(path).read_text()
    _, end = _markers(table.name)
    start = text.rfind('\n', 0, text.index(f'<!-- reproduce:{table.name} begin')) + 1
    return text[start:text.index(end) + len(end)]


def _same_metrics(rows: List[Dict[str, Any]], other: List[Dict[str, Any]]) -> bool:

    def metrics(rs: List[Dict[str, Any]]) -> List[tuple]:
        return [(r['config'], r.get('stock'), r.get('psa')) for r in rs]

    return metrics(rows) == metrics(other)


def compare_results(table: Table, records: List[Dict[str, Any]],
                    work_root: str) -> Tuple[bool, List[str]]:
    """Compare fresh metrics with the committed results JSON (the README's numbers).

    A metric is the same when it differs by at most the committed ``spread`` of its row (0
    without one). The installed package set is compared too (a different one explains a
    difference, it is not one).

    Returns:
        ``(same, lines)``: the verdict and what to print.
    """
    committed = json.loads(results_file(table).read_text())
    spread = (committed.get('spread') or {}).get('rows', {})
    fresh_env = environment(table, work_root)
    lock = _one(fresh_env.get('packages_hash'), str)
    old = {r['config']: r for r in committed['rows']}
    differ, noise = [], []
    for rec in records:
        before = old.get(rec['config'])
        for key in ('stock', 'psa'):
            was = before.get(key) if before else None
            now = rec.get(key)
            if was == now:
                continue
            delta = f' ({now - was:+.2f})' if was is not None and now is not None else ''
            line = (f'  {rec["config"]} {key} {rec["metric"]}: {now} here, {was} in the '
                    f'README{delta}')
            if was is None or now is None or abs(now - was) > spread.get(rec['config'], 0) + 1e-9:
                differ.append(line)
            else:
                noise.append(line + ' (within the spread)')
    if not differ:
        within = ' within the measured spread' if noise else ''
        return True, [f'same as the README{within} (lock {lock})'] + noise
    lines = [f'DIFFERENT from the README ({results_file(table)}):'] + differ + noise
    committed_lock = _one((committed.get('environment') or {}).get('packages_hash'), str)
    if committed_lock != lock:
        lines.append(f'  installed packages {lock} here, {committed_lock} for the README '
                     '(set up from the lock: tools/dev/setup_env.sh)')
    return False, lines


# ------------------------------------------------------------------ publish
def _software(record: Dict[str, Any]) -> str:
    """``torch 2.14.1 (CUDA 13.0), mmcv 2.1.0, ..., mmpsa 0.1.0 (commit ...)`` of a record."""
    versions = record.get('versions', {})
    names = [('torch', 'torch'), ('mmcv', 'mmcv'), ('mmengine', 'mmengine'),
             ('mmsegmentation', 'mmseg'), ('mmpose', 'mmpose'), ('mmpsa', 'mmpsa')]
    parts = []
    for dist, shown in names:
        if versions.get(dist):
            text = f'{shown} {versions[dist]}'
            if dist == 'torch' and versions.get('cuda'):
                unused = '' if versions.get('cuda_used') else ', unused'
                text += f' (CUDA {versions["cuda"]}{unused})'
            parts.append(text)
    return ', '.join(parts) + f'; mmpsa commit: {record.get("mmpsa_commit")}'


def published_entry(table: Table,
                    rec: Dict[str, Any],
                    weights_url: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The metafile entry of one gathered row: only what its runs measured and recorded.

    ``Results`` (the tested metric); ``Weights`` and ``Training log`` only under
    ``weights_url`` and only for files that exist; in ``Metadata`` what the jobs' run records
    say they ran on (``Training Resources`` and ``Training Software`` for a trained row, ``Test
    Resources`` and ``Test Software`` for released weights) and ``Memory (MB)`` where the logs
    have it. None for a row without a result.
    """
    if rec['psa'] is None:
        return None
    entry: Dict[str, Any] = {
        'Results': [{
            'Task': table.task,
            'Dataset': table.dataset,
            'Metrics': {
                rec['metric']: rec['psa']
            }
        }],
        'Metadata': {},
    }
    url = weights_url.rstrip('/') if weights_url else None
    if url and rec['checkpoint'] and osp.isfile(rec['checkpoint']):
        entry['Weights'] = f'{url}/{rec["config"]}/{osp.basename(rec["checkpoint"])}'
    if url and rec['log'] and osp.isfile(rec['log']):
        entry['Training log'] = (f'{url}/{rec["config"]}/{osp.basename(osp.dirname(rec["log"]))}/'
                                 f'{osp.basename(rec["log"])}')
    recorded = rec['records']
    prefix, sessions = (('Test', recorded['test'][-1:]) if rec['kind'] == RELEASED else
                        ('Training', recorded['train']))
    if sessions:
        entry['Metadata'][f'{prefix} Resources'] = _ran_on({'train': sessions, 'test': []})
        software = list(dict.fromkeys(_software(r) for r in sessions))
        entry['Metadata'][f'{prefix} Software'] = ' + '.join(software)
    if rec['memory_mb'] is not None:
        entry['Metadata']['Memory (MB)'] = rec['memory_mb']
    return entry


def publish(table: Table,
            work_root: str,
            weights_url: Optional[str] = None,
            metafile_root: Optional[Path] = None) -> List[str]:
    """Write the measured results of a gathered table into the PSA configs' metafile entries.

    Only what was measured and recorded goes in (:func:`published_entry`), nothing from the
    publish call's own options but ``weights_url``. Rows that did not finish, and configs
    without a metafile entry (the tiny ones), are left out.

    Args:
        table: The table.
        work_root: ``WORK_DIR`` of the launch.
        weights_url: Prefix under which the checkpoints and logs are uploaded
            (``<url>/<config>/<file>``); without it, no ``Weights`` and no ``Training log``.
        metafile_root: The configs folder whose metafiles are written (default: mmpsa's).

    Returns:
        The names of the models written.
    """
    from .model_index import update_models
    updates = {}
    for rec in gather(table, work_root):
        entry = published_entry(table, rec, weights_url)
        if entry is not None:
            updates[rec['config']] = entry
    return update_models(updates, metafile_root)


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
              echo: Callable[[str], None] = print,
              into: Optional[str] = None) -> Optional[List[Dict[str, Any]]]:
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
        into: A Markdown file (the README) whose block of this table is rewritten from the
            gathered rows, which are also kept as the table's committed results JSON
            (:func:`results_file`).

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
        if into:
            results = json.loads(js.read_text())
            for rec in results['rows']:  # the committed copy names no local paths
                rec['log'] = rec['checkpoint'] = None
                rec['records'] = {k: len(v) for k, v in rec['records'].items()}
            old = results_file(table)
            if old.is_file():  # a measured spread stays with the numbers it was measured for
                spread = json.loads(old.read_text()).get('spread')
                if spread and _same_metrics(json.loads(old.read_text())['rows'], results['rows']):
                    results['spread'] = spread
            old.parent.mkdir(parents=True, exist_ok=True)
            old.write_text(json.dumps(results, indent=2) + '\n')
            write_into(into, table, results)
            echo(f'wrote the table into {into} (from {_shown(old)})')
    if 'publish' in steps:
        names = publish(table, work_root, weights_url)
        echo(f'published {len(names)} models into their metafiles: {", ".join(names) or "-"}')
    return records
