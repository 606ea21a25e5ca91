"""Two CPU processes (gloo, plain BN): rank 0's validation equals tools/test.py on the saved
checkpoint, iteration- and epoch-based (issue 19 §3).

Each rank trains a toy BatchNorm model on its own shard, so the running statistics drift
apart unless :class:`~mmpsa.engine.SyncBuffersEveryIterHook` (added by the CPU fallback of
``tools/train.py --launcher pytorch``) keeps them equal. The validation is sharded too: rank
1's predictions, made with its own statistics, are part of the metric rank 0 logs.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpsa.apis.runner import test as run_test
from mmpsa.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[2]

PLUGIN = '''
"""Test-only: a toy BatchNorm model, sharded data, a metric that logs its value, a probe."""
import json
import os

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
from torch.utils.data import Dataset


@MODELS.register_module(force=True)
class PsaTestBNModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4, momentum=0.5)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, inputs, labels, mode='tensor'):
        out = self.head(self.bn(self.linear(torch.stack(inputs))))
        if mode == 'loss':
            return dict(loss=((out - torch.stack(labels))**2).mean())
        return [dict(pred=float(o)) for o in out]


@DATASETS.register_module(force=True)
class PsaTestShardedData(Dataset):
    """Samples whose scale grows with the index: each rank's shard has other statistics."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g) * (1 + i) + i
        return dict(inputs=x, labels=x[:1] * 0.5)


@METRICS.register_module(force=True)
class PsaTestMeanPred(BaseMetric):

    def __init__(self, out_file, **kwargs):
        super().__init__(**kwargs)
        self.out_file = out_file

    def process(self, data_batch, data_samples):
        self.results.extend(s['pred'] for s in data_samples)

    def compute_metrics(self, results):
        value = float(np.mean(results))
        with open(self.out_file, 'a') as f:
            f.write(json.dumps(value) + '\\n')
        return dict(mean_pred=value)


@HOOKS.register_module(force=True)
class PsaTestBufferProbe(Hook):

    def after_train(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        torch.save({k: v.clone() for k, v in model.named_buffers()},
                   os.path.join(runner.work_dir, f'buffers_rank{get_rank()}.pth'))
'''

CFG = '''
default_scope = 'mmseg'
custom_imports = dict(imports=['mmpsa', 'psa_test_bn'], allow_failed_imports=False)
model = dict(type='PsaTestBNModel')
train_dataloader = dict(batch_size=2, num_workers=0,
                        sampler=dict(type='DefaultSampler', shuffle=True),
                        dataset=dict(type='PsaTestShardedData', n=16))
val_dataloader = dict(batch_size=2, num_workers=0,
                      sampler=dict(type='DefaultSampler', shuffle=False),
                      dataset=dict(type='PsaTestShardedData', n=8))
test_dataloader = val_dataloader
val_evaluator = dict(type='PsaTestMeanPred', out_file={out!r})
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01))
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
randomness = dict(seed=0)
custom_hooks = [dict(type='PsaTestBufferProbe')]
'''

LOOPS = dict(
    iter=('train_cfg = dict(type="IterBasedTrainLoop", max_iters=4, val_interval=2)\n'
          'default_hooks = dict(checkpoint=dict(type="CheckpointHook", interval=2, '
          'by_epoch=False))\n', ['iter_2.pth', 'iter_4.pth']),
    epoch=('train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=2, val_interval=1)\n'
           'default_hooks = dict(checkpoint=dict(type="CheckpointHook", interval=1))\n',
           ['epoch_1.pth', 'epoch_2.pth']))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


DRIVER = '''
"""Run tools/train.py once per config in this process (one torchrun start for both loops)."""
import importlib.util
import sys

spec = importlib.util.spec_from_file_location('psa_tools_train', sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
for cfg, work_dir in zip(sys.argv[2::2], sys.argv[3::2]):
    tool.main([cfg, '--launcher', 'pytorch', '--work-dir', work_dir])
'''


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> Path:
    """Both toy configs trained by two gloo processes (``tools/train.py --launcher
    pytorch`` under torchrun)."""
    root = tmp_path_factory.mktemp('sync_buffers')
    (root / 'plugin').mkdir()
    (root / 'plugin' / 'psa_test_bn.py').write_text(PLUGIN)
    (root / 'drive.py').write_text(DRIVER)
    argv = []
    for loop, (loop_cfg, _) in LOOPS.items():
        cfg = root / f'{loop}.py'
        cfg.write_text(CFG.format(out=str(root / f'{loop}_val.jsonl')) + loop_cfg)
        argv += [str(cfg), str(root / f'{loop}_work')]
    env = dict(
        os.environ,
        OMP_NUM_THREADS='1',
        CUDA_VISIBLE_DEVICES='',
        PYTHONPATH=os.pathsep.join([str(root / 'plugin'), str(REPO)]))
    proc = subprocess.run(
        [
            sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
            str(_free_port()),
            str(root / 'drive.py'),
            str(REPO / 'tools/train.py')
        ] + argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sys.path.insert(0, str(root / 'plugin'))  # for the in-process tools/test.py runs
    yield root
    sys.path.remove(str(root / 'plugin'))


@pytest.mark.parametrize('loop', sorted(LOOPS))
def test_rank0_validation_equals_the_saved_checkpoints_test(trained, loop):
    work_dir = trained / f'{loop}_work'
    checkpoints = LOOPS[loop][1]
    buffers = [torch.load(work_dir / f'buffers_rank{rank}.pth') for rank in (0, 1)]
    last = read_checkpoint(work_dir / checkpoints[-1])['state_dict']
    for name in ('bn.running_mean', 'bn.running_var'):
        assert torch.equal(buffers[0][name], buffers[1][name])  # the ranks agree
        assert torch.equal(last[name], buffers[0][name])  # and the checkpoint holds that
    logged = [json.loads(line) for line in (trained / f'{loop}_val.jsonl').read_text().split()]
    assert len(logged) == 2  # rank 0's validations (the metric runs on rank 0 only)

    for ckpt, value in zip(checkpoints, logged):
        metrics = run_test(
            str(trained / f'{loop}.py'),
            str(work_dir / ckpt),
            work_dir=str(trained / f'{loop}_test'),
            cfg_options={'test_evaluator.out_file': str(trained / 'test.jsonl')})
        assert metrics['mean_pred'] == value, ckpt
