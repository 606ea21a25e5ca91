"""Library side of ``tools/train.py`` and ``tools/test.py``: build a config's runner and run it.

The tools do what mmseg's and mmpose's own ``tools/train.py``/``test.py`` do, for any mmpsa
(or stock) config: the runner comes from the config's ``default_scope`` registry
(``runner_type`` honoured, as ``configs/_base_/psa_runtime.py`` uses it), and ``--work-dir``,
``--resume [PATH]`` (mmpose's form), ``--amp``, ``--cfg-options`` and ``--launcher`` mean
what they mean there.

One addition: distributed training without GPUs. mmengine 0.10.7 initialises the process
group with ``torch.cuda.set_device`` and wraps the model with ``device_ids=[LOCAL_RANK]``, and
``SyncBatchNorm`` refuses CPU tensors; so where CUDA is unavailable, a distributed launch
initialises a gloo group itself before the runner is built (the runner then skips its own),
wraps with ``device_ids=None`` and uses plain BN for SyncBN, with
:class:`~mmpsa.engine.SyncBuffersEveryIterHook` giving back what SyncBN gave: equal running
statistics on every rank. On GPUs nothing changes.

Nothing goes on silently wrong: checkpoints are verified (CRCs) before a run is built on them,
and the run reads every checkpoint (``load_from``, ``resume``, ``pretrained=`` URLs) through
:func:`mmpsa.checkpoint.checkpoint_door`;
:class:`~mmpsa.engine.PSACheckpointHook` records the PSA settings in every checkpoint and
refuses a resume or a test with a checkpoint of another model; training first runs the cheap
part of :func:`mmpsa.datasets.check.check_dataset` on the train split.
"""
import importlib
import logging
import os
import os.path as osp
import subprocess
from typing import Any, Dict, List, Optional

import torch
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from ..checkpoint import checkpoint_door, fetch_and_verify, verify_checkpoint_file
from ..checkpoint.build import SCOPES, load_config, scope_of  # noqa: F401  (re-exported)
from ..datasets.check import check_dataset
from ..engine.runner import add_custom_hook
from ..necks import check_feature_channels

#: The ``default_scope`` values the tools know.
#: Values of ``--launcher``.
LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
#: Norm layer types that need GPUs, and what they become on CPU.
_SYNC_NORMS = {'SyncBN': 'BN', 'MMSyncBN': 'BN'}


class LaunchError(RuntimeError):
    """A run that cannot start as asked; the message says why and what to do."""


def set_work_dir(cfg: Config, config: str, work_dir: Optional[str]) -> None:
    """``--work-dir``, else the config's ``work_dir``, else ``./work_dirs/<config name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])


def set_resume(cfg: Config, resume: Optional[str]) -> None:
    """Apply ``--resume`` in mmpose's form and check the checkpoint it names.

    Args:
        cfg: The config (``work_dir`` set); changed in place.
        resume: None (the config decides), ``'auto'`` (the latest checkpoint of the work dir,
            as its ``last_checkpoint`` names it) or a checkpoint path.
    """
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume
    if cfg.get('load_from'):
        # checked before the run is built; a URL is downloaded now and read from the cache
        # by the run, whose messages name the URL
        cfg.load_from = _as_given(cfg.load_from, fetch_and_verify(cfg.load_from))
    elif cfg.get('resume'):
        last = osp.join(cfg.work_dir, 'last_checkpoint')
        if osp.isfile(last):
            with open(last) as f:
                verify_checkpoint_file(f.read().strip())


def set_amp(cfg: Config) -> None:
    """``--amp``: mixed precision through mmengine's ``AmpOptimWrapper`` (GPU/NPU/MLU only).

    Raises:
        LaunchError: Without such a device (``AmpOptimWrapper`` asserts one), or with a
            custom optimizer wrapper type.
    """
    from mmengine.device import get_device
    device = get_device()
    if device in ('cpu', 'mps'):
        raise LaunchError(
            f'--amp needs a GPU (or NPU/MLU/MUSA) device, and this process has {device!r}: '
            "mmengine's AmpOptimWrapper refuses to run without one. Train without --amp.")
    wrapper_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper_type == 'AmpOptimWrapper':
        print_log(
            'AMP training is already enabled in the config.',
            logger='current',
            level=logging.WARNING)
    elif wrapper_type != 'OptimWrapper':
        raise LaunchError(f'--amp works with the stock OptimWrapper, got {wrapper_type!r}')
    else:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def launcher_env(launcher: str, environ: Dict[str, str]) -> Dict[str, str]:
    """The ``torch.distributed`` ``env://`` variables a launcher's processes need.

    torchrun (``'pytorch'``) sets them itself; slurm and MPI name them their own way
    (translated here as mmengine's ``init_dist`` does).

    Args:
        launcher: One of ``'pytorch'``, ``'slurm'``, ``'mpi'``.
        environ: The process environment.

    Returns:
        Variables to add to the environment (existing ``MASTER_*`` values win).
    """
    if launcher == 'pytorch':
        return {}
    if launcher == 'slurm':
        env = dict(
            RANK=environ['SLURM_PROCID'],
            WORLD_SIZE=environ['SLURM_NTASKS'],
            LOCAL_RANK=environ.get('SLURM_LOCALID', '0'))
        if 'MASTER_ADDR' not in environ:
            node_list = environ['SLURM_NODELIST']
            env['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {node_list} | head -n1')
    elif launcher == 'mpi':
        env = dict(
            RANK=environ['OMPI_COMM_WORLD_RANK'],
            WORLD_SIZE=environ['OMPI_COMM_WORLD_SIZE'],
            LOCAL_RANK=environ['OMPI_COMM_WORLD_LOCAL_RANK'])
        if 'MASTER_ADDR' not in environ:
            raise LaunchError('--launcher mpi: set MASTER_ADDR to the address of rank 0')
    else:
        raise ValueError(f'launcher must be one of {LAUNCHERS[1:]}, got {launcher!r}')
    if 'MASTER_PORT' not in environ:
        env['MASTER_PORT'] = '29500'  # torch.distributed's default, as mmengine uses
    return env


def plain_bn(node: Any) -> None:
    """Turn every SyncBN norm config under ``node`` into plain BN, in place.

    Args:
        node: A config dict/list (e.g. ``cfg.model``).
    """
    if isinstance(node, dict):
        if node.get('type') in _SYNC_NORMS:
            node['type'] = _SYNC_NORMS[node['type']]
        for value in node.values():
            plain_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            plain_bn(value)


def prepare_distributed(cfg: Config) -> None:
    """Make a distributed launch (``cfg.launcher != 'none'``) work without CUDA.

    With CUDA this does nothing (the stock NCCL/SyncBN path). Without it: a gloo process
    group is initialised here, before the runner (which then skips its own ``init_dist``,
    where mmengine would call ``torch.cuda.set_device``); DDP wraps with ``device_ids=None``;
    SyncBN becomes BN and ``sync_bn`` is dropped (SyncBatchNorm refuses CPU tensors), and
    :class:`~mmpsa.engine.SyncBuffersEveryIterHook` keeps the ranks' BN statistics equal.

    Args:
        cfg: The config; changed in place.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return
    if not torch.distributed.is_initialized():
        os.environ.update(launcher_env(launcher, os.environ))
        dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
        kwargs = {}
        if dist_cfg.get('timeout') is not None:
            import datetime
            kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        torch.distributed.init_process_group(backend='gloo', init_method='env://', **kwargs)
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'

    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            device_ids=None,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper['device_ids'] = None
    plain_bn(cfg.model)
    cfg.pop('sync_bn', None)
    add_custom_hook(cfg, dict(type='SyncBuffersEveryIterHook'))


def build_runner(cfg: Config) -> Runner:
    """Build the runner of a config from its ``default_scope``'s ``RUNNERS`` registry.

    ``runner_type`` is honoured as in mmseg's tools (mmpsa's exact-resume runner is selected
    this way); without it, this is ``Runner.from_cfg``.

    Args:
        cfg: The config, with ``default_scope`` in :data:`SCOPES`.

    Returns:
        The runner.
    """
    registry = importlib.import_module(f'{scope_of(cfg)}.registry').RUNNERS
    runner = registry.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    # the runner has built (and maybe wrapped) the model: its PSA necks and heads are checked
    # against what feeds them now, not at the first forward after the data is loaded
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    check_feature_channels(model)
    return runner


def train(config: str,
          work_dir: Optional[str] = None,
          resume: Optional[str] = None,
          amp: bool = False,
          cfg_options: Optional[Dict[str, Any]] = None,
          launcher: str = 'none',
          check_data: bool = True) -> Runner:
    """Train a config, as ``tools/train.py`` does.

    Args:
        config: Config file path.
        work_dir: Where logs and checkpoints go (default: the config's, else
            ``./work_dirs/<config name>``).
        resume: None, ``'auto'`` (latest checkpoint in the work dir) or a checkpoint path.
        amp: Mixed-precision training (needs a GPU).
        cfg_options: Config overrides.
        launcher: One of :data:`LAUNCHERS`.
        check_data: Run the cheap dataset check (counts, first sample) of the train split
            first (:class:`~mmpsa.datasets.check.DatasetCheckError` if it fails).

    Returns:
        The runner after training.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher must be one of {LAUNCHERS}, got {launcher!r}')
    cfg = load_config(config, cfg_options)
    cfg.launcher = launcher
    set_work_dir(cfg, config, work_dir)
    if amp:
        set_amp(cfg)
    set_resume(cfg, resume)
    if check_data:
        check_dataset(cfg, 'train', full=False).raise_if_bad()
    add_custom_hook(cfg, dict(type='PSACheckpointHook'))
    prepare_distributed(cfg)
    with checkpoint_door():  # load_from, resume and pretrained= URLs read through the door
        runner = build_runner(cfg)
        runner.train()
    return runner


def test(config: str,
         checkpoint: str,
         work_dir: Optional[str] = None,
         out: Optional[str] = None,
         cfg_options: Optional[Dict[str, Any]] = None,
         launcher: str = 'none',
         allow_missing_psa: bool = False) -> dict:
    """Test a checkpoint, as ``tools/test.py`` does.

    Args:
        config: Config file path.
        checkpoint: The checkpoint to evaluate.
        work_dir: Where logs and metrics go (default as in :func:`train`).
        out: As the stock tool of the config's scope: mmseg, a folder for the predicted
            label maps (``IoUMetric(output_dir=..., keep_results=True)``); mmpose, a file
            (``.json``/``.yaml``/``.pkl``) for the metric results.
        cfg_options: Config overrides.
        launcher: One of :data:`LAUNCHERS`.
        allow_missing_psa: Test a checkpoint without PSA weights (stock) with a PSA config
            on purpose; otherwise that is a :class:`~mmpsa.checkpoint.CheckpointMismatchError`.

    Returns:
        The test metrics.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher must be one of {LAUNCHERS}, got {launcher!r}')
    cfg = load_config(config, cfg_options)
    cfg.launcher = launcher
    set_work_dir(cfg, config, work_dir)
    # checked before the run is built; a URL is downloaded now and read from the cache by
    # the run, whose messages name the URL
    cfg.load_from = _as_given(checkpoint, fetch_and_verify(checkpoint))
    add_custom_hook(
        cfg,
        dict(type='PSACheckpointHook', purpose='test', allow_missing_psa=allow_missing_psa),
        replace=True)
    if out is not None and cfg.default_scope == 'mmseg':
        for evaluator in _as_list(cfg.test_evaluator):
            evaluator['output_dir'] = out
            evaluator['keep_results'] = True
    prepare_distributed(cfg)
    with checkpoint_door():  # the checkpoint (and any pretrained= URL) through the door
        runner = build_runner(cfg)
        metrics = runner.test()
    if out is not None and cfg.default_scope == 'mmpose' and is_main_process():
        import mmengine
        mmengine.dump(metrics, out)
    return metrics


def _as_given(name: str, local: str) -> str:
    """What the run loads: a URL or named model as given (the door reads it from the cache
    :func:`~mmpsa.checkpoint.fetch_and_verify` filled), else the local path."""
    return str(name) if '://' in str(name) else local


def _as_list(value: Any) -> List[Any]:
    """A config entry that may be one dict or a list of them, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]
