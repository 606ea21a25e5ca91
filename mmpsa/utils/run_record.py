"""What ran: a record written inside each training or test job, read by the reproduction tool.

:class:`RunRecordHook` writes ``<log_dir>/run_record.json`` (mmengine's ``work_dir/<timestamp>/``,
beside the session's text log) from rank 0 when the job starts, and adds the end time when it
ends. It is written by the job itself, so it says what ran where it ran (a slurm or mim launch
starts from a login node, whose settings say nothing about the job): the launcher, world size,
processes and GPUs per node, the GPU, the versions of torch, CUDA, mmcv, mmengine, mmseg,
mmpose and mmpsa, mmpsa's git commit (or ``'not a git checkout'`` for a wheel) and a hash of
the installed package set. ``tools/reproduce.py`` adds the hook to every run it launches as
``--cfg-options default_hooks.run_record.type=mmpsa.utils.run_record.RunRecordHook`` (a new key
of ``default_hooks``, which mmengine merges into its defaults: no config's ``custom_hooks`` is
replaced); any config can list it the same way.
"""
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .lock import installed_packages, packages_hash  # noqa: F401  (re-exported)

#: The record's file name, in each session's log dir.
RECORD_FILE = 'run_record.json'
#: The hook's type as ``--cfg-options`` give it (the dotted name imports this module).
HOOK_TYPE = 'mmpsa.utils.run_record.RunRecordHook'
NOT_A_CHECKOUT = 'not a git checkout'
#: Variables that change CPU numerics (thread counts, instruction sets), recorded when set.
_THREAD_VARIABLES = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'MKL_CBWR', 'ONEDNN_MAX_CPU_ISA',
                     'DNNL_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY')
_LIBRARIES = ('torch', 'mmcv', 'mmengine', 'mmsegmentation', 'mmpose', 'mmdet', 'mmpsa')


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(folder: Optional[Path] = None) -> str:
    """mmpsa's commit (``+dirty`` with local changes), or :data:`NOT_A_CHECKOUT`.

    Args:
        folder: The package folder (default: the imported ``mmpsa``'s). It counts as a
            checkout only when the repository's top level holds it as ``mmpsa/``: a wheel
            installed into some other repository's tree is not.
    """
    if folder is None:
        from .paths import package_root
        folder = package_root()
    folder = Path(folder).resolve()

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(['git', '-C', str(folder), *args],
                                 capture_output=True,
                                 text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git('rev-parse', '--show-toplevel')
    if not top or Path(top).resolve() / 'mmpsa' != folder:
        return NOT_A_CHECKOUT
    commit = git('rev-parse', 'HEAD')
    if not commit:
        return NOT_A_CHECKOUT
    dirty = git('status', '--porcelain', '--untracked-files=no', '--', top)
    return commit + ('+dirty' if dirty else '')


def machine() -> Dict[str, Any]:
    """The machine a process runs on: OS, architecture, CPU count, Python."""
    return {
        'system': f'{platform.system()} {platform.release()}',
        'machine': platform.machine(),
        'cpus': os.cpu_count(),
        'python': platform.python_version(),
    }


def collect(launcher: str, world_size: int) -> Dict[str, Any]:
    """What runs here now, as :class:`RunRecordHook` records it at a job's start.

    Args:
        launcher: The runner's launcher (``'none'``, ``'pytorch'``, ``'slurm'``, ``'mpi'``).
        world_size: The number of processes of the job.
    """
    import torch
    local = os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('SLURM_NTASKS_PER_NODE')
    per_node = int(local.split('(')[0]) if local else 1
    cuda = torch.cuda.is_available()
    packages = installed_packages()
    versions = {name: _version(name) for name in _LIBRARIES}
    versions['cuda'] = torch.version.cuda
    versions['cuda_used'] = cuda
    return {
        'launcher': launcher,
        'world_size': world_size,
        'processes_per_node': per_node,
        'nodes': max(1, world_size // per_node),
        'gpus_per_node': per_node if cuda else 0,
        'gpu': torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else None,
        'versions': versions,
        'mmpsa_commit': git_commit(),
        'packages_hash': packages_hash(packages),
        'packages': packages,
        'machine': machine(),
        'threads': torch.get_num_threads(),
        'environment': {
            k: os.environ[k]
            for k in _THREAD_VARIABLES if k in os.environ
        },
        'command': [os.path.basename(sys.argv[0])] + sys.argv[1:],
    }


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec='seconds')


@HOOKS.register_module()
class RunRecordHook(Hook):
    """Write :data:`RECORD_FILE` into the session's log dir: at ``before_run`` (rank 0) what
    runs (:func:`collect`) and ``start``; at ``after_run`` the ``end`` time.

    A session killed before its end keeps a record without ``end``.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self.path: Optional[Path] = None

    def before_run(self, runner) -> None:
        from mmengine.dist import get_world_size, is_main_process
        if not is_main_process():
            return
        record = {'start': _now(), 'end': None}
        record.update(collect(runner.launcher, get_world_size()))
        self.path = Path(runner.log_dir) / RECORD_FILE
        self._write(record)

    def after_run(self, runner) -> None:
        if self.path is None or not self.path.is_file():
            return
        record = json.loads(self.path.read_text())
        record['end'] = _now()
        self._write(record)

    def _write(self, record: Dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + '.tmp')
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.path)


def read_records(folder: Path) -> List[Dict[str, Any]]:
    """The run records of every session under a work dir (``<folder>/*/run_record.json``),
    oldest first, each with ``log_dir``."""
    records = []
    for path in sorted(Path(folder).glob(f'*/{RECORD_FILE}')):
        record = json.loads(path.read_text())
        record['log_dir'] = str(path.parent)
        records.append(record)
    return records


def resources(record: Dict[str, Any]) -> str:
    """``'8x NVIDIA A100-SXM4-80GB (2 nodes)'``, ``'1x CPU (no GPU)'``: what a record says
    the job ran on."""
    if record.get('gpu'):
        text = f'{record["world_size"]}x {record["gpu"]}'
    else:
        text = f'{record["world_size"]}x CPU (no GPU)'
    if record.get('nodes', 1) > 1:
        text += f' ({record["nodes"]} nodes)'
    return text
