"""tools/train.py, tools/test.py, tools/dist_train.sh and the shared runtime base (issue 12 §2).

The expensive one: ``tools/dist_train.sh CONFIG 2`` starts two processes with torchrun on
this CPU and trains the tiny PSA HRNet + FCN (its norm set to SyncBN, as the GPU configs
have it) with DDP for two iterations; then ``tools/test.py`` evaluates the checkpoint.
"""
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from mmengine.config import Config

from mmpsa.apis.runner import (LaunchError, build_runner, launcher_env, load_config, plain_bn,
                               prepare_distributed, set_resume)
from mmpsa.checkpoint import read_checkpoint
from mmpsa.engine import ExactResumeRunner
from mmpsa.engine.runner import exact_resume_cfg

REPO = Path(__file__).resolve().parents[2]
SEG_BASE = REPO / 'configs/mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
RUNTIME = REPO / 'configs/_base_/psa_runtime.py'

PROBE = '''
"""Test-only hook: each rank writes its weights before and after training, and the
checkpoint files it wrote."""
import os

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

import mmengine.config.config

# mmengine re-formats the whole config with yapf for every log, dump and checkpoint (about
# a second each here); the text only looks different without it. Not what is tested.
mmengine.config.config.FormatCode = lambda text, **kwargs: (text, False)

import mmpsa.engine.hooks


@HOOKS.register_module(force=True)
class PsaTestDDPProbe(Hook):

    def before_train(self, runner):
        self.saved = []
        write = mmpsa.engine.hooks.atomic_write

        def counting_write(data, path):
            if path.endswith('.pth'):
                self.saved.append(os.path.basename(path))
            return write(data, path)

        mmpsa.engine.hooks.atomic_write = counting_write
        self._dump(runner, 'before')

    def after_train(self, runner):
        self._dump(runner, 'after')

    def _dump(self, runner, when):
        model = getattr(runner.model, 'module', runner.model)
        torch.save(
            dict(params={k: v.detach().clone() for k, v in model.named_parameters()},
                 saved=list(self.saved),
                 wrapper=type(runner.model).__name__,
                 world_size=get_world_size(),
                 norms=sorted({type(m).__name__ for m in model.modules()
                               if 'Norm' in type(m).__name__})),
            os.path.join(runner.work_dir, f'probe_{when}_rank{get_rank()}.pth'))
'''

DDP_CFG = '''
_base_ = [{base!r}, {runtime!r}]
custom_imports = dict(imports=['mmpsa', 'psa_test_probe'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(backbone=dict(norm_cfg=norm_cfg), decode_head=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
val_dataloader = dict(dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
custom_hooks = [dict(type='PsaTestDDPProbe')]
'''

pytestmark = pytest.mark.usefixtures('cpu_without_yapf')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def seg_cfg(tmp_path_factory) -> Iterator[Path]:
    """The DDP config (tiny PSA seg model, SyncBN) on tiny Cityscapes-format data."""
    from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes
    root = tmp_path_factory.mktemp('tools')
    make_tiny_cityscapes(root / 'city', num_train=4, num_val=2, size=(64, 128))
    (root / 'plugin').mkdir()
    (root / 'plugin' / 'psa_test_probe.py').write_text(PROBE)
    cfg = root / 'ddp.py'
    cfg.write_text(DDP_CFG.format(base=str(SEG_BASE), runtime=str(RUNTIME), data=f'{root}/city/'))
    sys.path.insert(0, str(root / 'plugin'))  # for the in-process tools/test.py
    yield cfg
    sys.path.remove(str(root / 'plugin'))


def test_ddp_on_cpu_with_torchrun(seg_cfg, tmp_path, load_tool):
    work_dir = tmp_path / 'ddp'
    env = dict(
        os.environ,
        OMP_NUM_THREADS='1',
        CUDA_VISIBLE_DEVICES='',
        PORT=str(_free_port()),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ['PATH']]),
        PYTHONPATH=os.pathsep.join([str(seg_cfg.parent / 'plugin'),
                                    str(REPO)]))
    proc = subprocess.run(
        ['bash',
         str(REPO / 'tools/dist_train.sh'),
         str(seg_cfg), '2', '--work-dir',
         str(work_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    probes = {
        (when, rank): torch.load(work_dir / f'probe_{when}_rank{rank}.pth')
        for when in ('before', 'after')
        for rank in (0, 1)
    }  # both ranks finished
    for probe in probes.values():
        assert probe['wrapper'] == 'MMDistributedDataParallel' and probe['world_size'] == 2
        assert 'SyncBatchNorm' not in probe['norms'] and 'BatchNorm2d' in probe['norms']
    after = [probes['after', rank]['params'] for rank in (0, 1)]
    before = probes['before', 0]['params']
    assert after[0].keys() == after[1].keys() == before.keys()
    assert all(torch.equal(after[0][k], after[1][k]) for k in before)  # ranks agree
    assert any(not torch.equal(after[0][k], before[k]) for k in before)  # and trained

    # one checkpoint, written by rank 0 only, holding both ranks' RNG states
    assert probes['after', 0]['saved'] == ['iter_2.pth'] and probes['after', 1]['saved'] == []
    assert sorted(p.name for p in work_dir.iterdir()
                  if p.suffix == '.pth' and not p.name.startswith('probe')) == ['iter_2.pth']
    ckpt = read_checkpoint(work_dir / 'iter_2.pth')
    assert len(ckpt['message_hub']['runtime_info']['rng_states']['states']) == 2
    assert all(torch.equal(ckpt['state_dict'][k], after[0][k]) for k in before)

    # tools/test.py on that checkpoint (one process, SyncBN reverted by the runner)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_tool('test').main([
            str(seg_cfg),
            str(work_dir / 'iter_2.pth'), '--work-dir',
            str(tmp_path / 'test'), '--out',
            str(tmp_path / 'pred'), '--cfg-options', 'experiment_name=tools-test',
            'visualizer.name=tools-test'
        ])
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / 'pred').rglob('*.png'))) == 2  # one label map per image
    logs = list((tmp_path / 'test').rglob('*.log'))
    assert len(logs) == 1 and 'mIoU' in logs[0].read_text()


def test_resume_takes_mmposes_form(tmp_path, load_tool):
    parse = load_tool('train').parse_args
    assert parse(['c.py']).resume is None
    assert parse(['c.py', '--resume']).resume == 'auto'
    assert parse(['c.py', '--resume', 'x.pth']).resume == 'x.pth'

    ckpt = tmp_path / 'iter_1.pth'
    torch.save(dict(meta={}), ckpt)
    cfg = Config(dict(work_dir=str(tmp_path), resume=False, load_from='old.pth'))
    set_resume(cfg, 'auto')
    assert cfg.resume is True and cfg.load_from is None
    set_resume(cfg, str(ckpt))
    assert cfg.resume is True and cfg.load_from == str(ckpt)
    cfg = Config(dict(work_dir=str(tmp_path), resume=False, load_from=None))
    set_resume(cfg, None)
    assert cfg.resume is False and cfg.load_from is None


def test_amp_on_cpu_is_a_clear_error(seg_cfg, monkeypatch, load_tool):
    import mmengine.device
    monkeypatch.setattr(mmengine.device, 'get_device', lambda: 'cpu')  # as on this machine
    with pytest.raises(SystemExit) as exit_info:
        load_tool('train').main([str(seg_cfg), '--amp'])
    assert 'needs a GPU' in str(exit_info.value.code)
    assert 'AmpOptimWrapper' in str(exit_info.value.code)


def test_launcher_env_translates_slurm_and_mpi():
    slurm = launcher_env(
        'slurm', dict(SLURM_PROCID='3', SLURM_NTASKS='8', SLURM_LOCALID='1', MASTER_ADDR='node0'))
    assert slurm == dict(RANK='3', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_PORT='29500')
    mpi = launcher_env(
        'mpi',
        dict(
            OMPI_COMM_WORLD_RANK='1',
            OMPI_COMM_WORLD_SIZE='2',
            OMPI_COMM_WORLD_LOCAL_RANK='1',
            MASTER_ADDR='h',
            MASTER_PORT='1234'))
    assert mpi == dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1')
    assert launcher_env('pytorch', {}) == {}
    with pytest.raises(LaunchError, match='MASTER_ADDR'):
        launcher_env(
            'mpi',
            dict(
                OMPI_COMM_WORLD_RANK='0', OMPI_COMM_WORLD_SIZE='1', OMPI_COMM_WORLD_LOCAL_RANK='0'))


def test_single_process_config_is_left_alone():
    model = dict(
        backbone=dict(norm_cfg=dict(type='SyncBN')), heads=[dict(norm_cfg=dict(type='MMSyncBN'))])
    cfg = Config(dict(launcher='none', model=model))
    prepare_distributed(cfg)
    assert cfg.model.backbone.norm_cfg.type == 'SyncBN' and 'model_wrapper_cfg' not in cfg
    plain_bn(cfg.model)
    assert cfg.model.backbone.norm_cfg.type == 'BN' and cfg.model.heads[0].norm_cfg.type == 'BN'


@pytest.mark.parametrize('stock, loop', [
    ('mmseg::hrnet/fcn_hr18s_4xb2-40k_cityscapes-512x1024.py', 'ExactResumeIterBasedTrainLoop'),
    ('mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_hrnet-w32_8xb64-210e_coco-256x192.py',
     'ExactResumeEpochBasedTrainLoop'),
])
def test_runtime_base_beside_a_stock_base(tmp_path, stock, loop):
    """The one shared base turns mmseg's iteration- and mmpose's epoch-based loop into ours
    (and the CheckpointHook into SafeCheckpointHook) through the runner it selects."""
    path = tmp_path / 'user_config.py'
    path.write_text(f'_base_ = [{stock!r}, {str(RUNTIME)!r}]\n')
    cfg = load_config(str(path))
    registry = importlib.import_module(f'{cfg.default_scope}.registry').RUNNERS
    assert registry.get(cfg.runner_type) is ExactResumeRunner
    exact_resume_cfg(cfg)
    assert cfg.train_cfg.type == loop
    assert cfg.default_hooks.checkpoint.type == 'SafeCheckpointHook'


def test_unknown_scope_is_refused(tmp_path):
    path = tmp_path / 'det.py'
    path.write_text("default_scope = 'mmdet'\n")
    with pytest.raises(ValueError, match="got 'mmdet'"):
        load_config(str(path))
    with pytest.raises(ValueError, match='default_scope'):
        build_runner(Config(dict(default_scope=None)))


def test_mim_train_uses_the_runtime_base(seg_cfg, tmp_path):
    """`mim train mmseg CONFIG --gpus 0` (mmseg's own tools/train.py, which builds the runner
    named by `runner_type`) trains our config with the exact-resume runner: its checkpoint
    carries the RNG states that only SafeCheckpointHook writes."""
    mim = Path(sys.executable).parent / 'mim'
    assert mim.exists(), 'openmim is not installed in this environment (ENVIRONMENT.md)'
    work_dir = tmp_path / 'mim'
    env = dict(
        os.environ,
        OMP_NUM_THREADS='1',
        CUDA_VISIBLE_DEVICES='',
        PYTHONPATH=os.pathsep.join([str(seg_cfg.parent / 'plugin'),
                                    str(REPO)]))
    proc = subprocess.run([
        str(mim), 'train', 'mmseg',
        str(seg_cfg), '--gpus', '0', '--work-dir',
        str(work_dir), '--cfg-options', 'train_cfg.max_iters=1', 'train_cfg.val_interval=1',
        'default_hooks.checkpoint.interval=1'
    ],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ckpt = read_checkpoint(work_dir / 'iter_1.pth')
    assert ckpt['message_hub']['runtime_info']['rng_states']['iter'] == 1
    assert "type='ExactResumeIterBasedTrainLoop'" in ''.join(p.read_text()
                                                             for p in work_dir.rglob('*.log'))


def test_the_train_tool_names_a_head_mismatch_when_it_builds_the_model(seg_cfg, tmp_path):
    """No global hook checks a plain build (mmpsa/__init__); the tools' runner checks the PSA
    necks and heads once it has built the model, before any data is loaded."""
    cfg = load_config(str(seg_cfg))
    cfg.work_dir = str(tmp_path / 'w')
    channels = cfg.model.decode_head.in_channels
    cfg.model.decode_head.update(
        type='PSAFCNHead',
        psa=dict(mode='parallel'),
        in_channels=channels[:-1] + [channels[-1] + 8])
    with pytest.raises(ValueError, match=r'in_channels does not match the backbone'):
        build_runner(cfg)
