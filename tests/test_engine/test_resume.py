"""Nothing lost when training dies (issue 12 §3), on the tiny seg and pose configs.

A training process is SIGKILLed for real — the seg one midway through writing its second
checkpoint, the pose one during the epoch after a checkpoint — and ``tools/train.py
--resume`` continues in its work dir. The losses of every following iteration must equal,
bit for bit, those of an uninterrupted run with the same seed: random augmentation
(RandomResize/RandomCrop/RandomFlip, RandomFlip/RandomBBoxTransform), a shuffling sampler and
a validation at the checkpoint included. The killed runs are subprocesses (one each, started
together); the uninterrupted and the resumed runs run in this process, single-threaded like
the subprocesses so that the floating point is the same.
"""
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import pytest
import torch

from mmpsa.apis.runner import train
from mmpsa.checkpoint import CheckpointReadError, read_checkpoint
from mmpsa.checkpoint.door import _torch_load

REPO = Path(__file__).resolve().parents[2]
SEG_BASE = REPO / 'configs/mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
POSE_BASE = REPO / 'configs/mmpose/tiny/td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py'
RUNTIME = REPO / 'configs/_base_/psa_runtime.py'

PLUGIN = '''
"""Test-only hooks: log every loss; SIGKILL this process at an iteration or mid-save."""
import json
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

import mmengine.config.config

# mmengine re-formats the whole config with yapf for every log, dump and checkpoint (about
# a second each here); the text only looks different without it. Not what is tested.
mmengine.config.config.FormatCode = lambda text, **kwargs: (text, False)


@HOOKS.register_module(force=True)
class PsaTestLossLog(Hook):
    priority = 'LOWEST'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        with open(os.path.join(runner.work_dir, 'losses.jsonl'), 'a') as f:
            loss = float(outputs['loss'].detach())
            f.write(json.dumps(dict(iter=runner.iter, loss=loss)) + '\\n')


@HOOKS.register_module(force=True)
class PsaTestKill(Hook):
    priority = 'LOWEST'

    def __init__(self, at_iter=-1, during_save=None):
        self.at_iter = at_iter
        self.during_save = during_save

    def before_train(self, runner):
        if self.during_save is None:
            return
        real_fsync, prefix = os.fsync, '.' + self.during_save + '.'

        def fsync(fd):  # the file is written, not yet renamed: cut it short and die
            if os.path.basename(os.readlink('/proc/self/fd/%d' % fd)).startswith(prefix):
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(fd)

        os.fsync = fsync

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at_iter:
            os.kill(os.getpid(), signal.SIGKILL)
'''

SEG_CFG = '''
_base_ = [{base!r}, {runtime!r}]
custom_imports = dict(imports=['mmpsa', 'psa_test_plugin'], allow_failed_imports=False)
train_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
val_dataloader = dict(dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=6, val_interval=3)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=3))
custom_hooks = [dict(type='PsaTestLossLog')]
'''

POSE_CFG = '''
_base_ = [{base!r}, {runtime!r}]
custom_imports = dict(imports=['mmpsa', 'psa_test_plugin'], allow_failed_imports=False)
data_root = {data!r}
train_dataloader = dict(batch_size=4, dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=4, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/person_keypoints_val2017.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=2, val_interval=1)
param_scheduler = [dict(type='LinearLR', begin=0, end=4, start_factor=0.1, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1))
custom_hooks = [dict(type='PsaTestLossLog')]
'''

pytestmark = pytest.mark.usefixtures('cpu_without_yapf')


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train in this process as the subprocesses do (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _losses(path: Path) -> Dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r['iter']: r['loss'] for r in records}


@pytest.fixture(scope='module')
def killed(tmp_path_factory) -> dict:
    """Tiny data and configs; the seg and pose runs that get SIGKILLed (run together)."""
    from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes
    from mmpsa.datasets.coco_tiny import make_tiny_coco

    root = tmp_path_factory.mktemp('resume')
    make_tiny_cityscapes(root / 'city', num_train=4, num_val=2, size=(64, 128))
    make_tiny_coco(str(root / 'coco'), num_train=4, num_val=2)
    (root / 'plugin').mkdir()
    (root / 'plugin' / 'psa_test_plugin.py').write_text(PLUGIN)
    cfgs = dict(
        seg=SEG_CFG.format(base=str(SEG_BASE), runtime=str(RUNTIME), data=f'{root}/city/'),
        pose=POSE_CFG.format(base=str(POSE_BASE), runtime=str(RUNTIME), data=f'{root}/coco/'))
    kills = dict(
        seg="dict(type='PsaTestKill', during_save='iter_6.pth')",
        pose="dict(type='PsaTestKill', at_iter=6)")
    for task, text in cfgs.items():
        (root / f'{task}.py').write_text(text)
        (root / f'{task}_kill.py').write_text(
            f"_base_ = ['./{task}.py']\n"
            f"custom_hooks = [dict(type='PsaTestLossLog'), {kills[task]}]\n")
    sys.path.insert(0, str(root / 'plugin'))

    env = dict(
        os.environ,
        OMP_NUM_THREADS='1',
        CUDA_VISIBLE_DEVICES='',
        MKL_NUM_THREADS='1',
        PYTHONPATH=os.pathsep.join([str(root / 'plugin'), str(REPO)]))
    procs = {
        task:
        subprocess.Popen([
            sys.executable,
            str(REPO / 'tools/train.py'),
            str(root / f'{task}_kill.py'), '--work-dir',
            str(root / f'{task}_killed')
        ],
                         env=env,
                         stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT,
                         text=True)
        for task in cfgs
    }
    outputs = {task: proc.communicate(timeout=600)[0] for task, proc in procs.items()}
    for task, proc in procs.items():
        assert proc.returncode == -signal.SIGKILL, outputs[task][-3000:]
    yield root
    sys.path.remove(str(root / 'plugin'))


def _resume(root: Path, task: str, load_tool) -> Dict[int, float]:
    """``tools/train.py CONFIG --resume`` in the killed run's work dir; its losses."""
    work_dir = root / f'{task}_killed'
    (work_dir / 'losses.jsonl').rename(work_dir / 'losses_before_kill.jsonl')
    with _one_thread():
        load_tool('train').main([
            str(root / f'{task}.py'), '--work-dir',
            str(work_dir), '--resume', '--cfg-options', f'experiment_name={task}-resumed',
            f'visualizer.name={task}-resumed'
        ])
    return _losses(work_dir / 'losses.jsonl')


def _uninterrupted(root: Path, task: str) -> Dict[int, float]:
    with _one_thread():
        train(
            str(root / f'{task}.py'),
            work_dir=str(root / f'{task}_full'),
            cfg_options={
                'experiment_name': f'{task}-full',
                'visualizer.name': f'{task}-full'
            })
    return _losses(root / f'{task}_full' / 'losses.jsonl')


def test_seg_save_killed_midway_leaves_the_previous_checkpoint(killed):
    work_dir = killed / 'seg_killed'
    names = sorted(os.listdir(work_dir))
    assert 'iter_3.pth' in names and 'iter_6.pth' not in names
    partial = [n for n in names if n.startswith('.iter_6.pth.') and n.endswith('.tmp')]
    assert len(partial) == 1 and (work_dir / partial[0]).stat().st_size > 0
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'iter_3.pth')
    ckpt = read_checkpoint(work_dir / 'iter_3.pth')
    assert ckpt['meta']['iter'] == 3
    assert ckpt['message_hub']['runtime_info']['rng_states']['iter'] == 3
    assert sorted(_losses(work_dir / 'losses.jsonl')) == [0, 1, 2, 3, 4]  # died saving 6


def test_seg_resume_after_sigkill_is_exact(killed, load_tool):
    full = _uninterrupted(killed, 'seg')
    resumed = _resume(killed, 'seg', load_tool)
    assert sorted(full) == list(range(6))
    assert sorted(resumed) == [3, 4, 5]  # from iter_3.pth, validated at iteration 3
    assert [resumed[i] for i in (3, 4, 5)] == [full[i] for i in (3, 4, 5)]
    before_kill = _losses(killed / 'seg_killed' / 'losses_before_kill.jsonl')
    assert [before_kill[i] for i in range(5)] == [full[i] for i in range(5)]
    work_dir = killed / 'seg_killed'
    assert not [n for n in os.listdir(work_dir) if n.endswith('.tmp')]  # cleaned on start
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'iter_6.pth')


def test_pose_resume_at_epoch_boundary_is_exact(killed, load_tool):
    full = _uninterrupted(killed, 'pose')
    resumed = _resume(killed, 'pose', load_tool)
    iters_per_epoch = len(full) // 2
    assert sorted(full) == list(range(2 * iters_per_epoch))
    second_epoch = list(range(iters_per_epoch, 2 * iters_per_epoch))
    assert sorted(resumed) == second_epoch  # from epoch_1.pth
    assert [resumed[i] for i in second_epoch] == [full[i] for i in second_epoch]


def _truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) // 2])
    return dst


def test_truncated_checkpoint_fails_with_an_error_naming_it(killed, tmp_path, load_tool):
    bad = _truncated_copy(killed / 'seg_killed' / 'iter_3.pth', tmp_path / 'iter_3.pth')
    tool = load_tool('train')
    for argv in (['--resume', str(bad)], ['--cfg-options', f'load_from={bad}']):
        with pytest.raises(SystemExit) as exit_info:
            tool.main([str(killed / 'seg.py'), '--work-dir', str(tmp_path / 'w')] + argv)
        message = str(exit_info.value.code)
        assert str(bad) in message and 'without its central directory' in message
    with pytest.raises(SystemExit, match='does not exist'):
        tool.main([str(killed / 'seg.py'), '--resume', str(tmp_path / 'missing.pth')])


def test_corrupt_checkpoint_data_fails_with_an_error_naming_it(killed, tmp_path):
    """A complete zip archive whose pickle is zeroed passes the quick check; its CRC check
    (before the runner is built) names the file."""
    import zipfile
    good = killed / 'seg_killed' / 'iter_3.pth'
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith('/data.pkl'))
    start = _record_start(good, info.filename)
    data[start:start + info.compress_size] = b'\x00' * info.compress_size
    bad = tmp_path / 'iter_3.pth'
    bad.write_bytes(bytes(data))
    with _one_thread(), pytest.raises(CheckpointReadError, match='fails its CRC check') as err:
        train(
            str(killed / 'seg.py'),
            work_dir=str(tmp_path / 'w'),
            resume=str(bad),
            cfg_options={
                'experiment_name': 'seg-corrupt',
                'visualizer.name': 'seg-corrupt'
            })
    assert str(bad) in str(err.value)


def _record_start(path: Path, name: str) -> int:
    """Where the data of the zip record ``name`` starts in ``path``."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    data = path.read_bytes()
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + o:info.header_offset + o + 2], 'little')
        for o in (26, 28))
    return info.header_offset + 30 + name_len + extra_len


def test_zeroed_tensor_bytes_stop_resume_and_test_naming_the_record(killed, tmp_path, load_tool):
    """4 KiB of zeros inside the largest tensor: torch.load takes it, the CRC check does not."""
    import zipfile
    good = killed / 'seg_killed' / 'iter_3.pth'
    with zipfile.ZipFile(good) as archive:
        record = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(good.read_bytes())
    start = _record_start(good, record.filename) + record.file_size // 2
    data[start:start + 4096] = b'\x00' * 4096
    bad = tmp_path / 'iter_3.pth'
    bad.write_bytes(bytes(data))
    _torch_load(str(bad), 'cpu')  # the unpickling alone takes it silently
    for tool, argv in (('train', [str(killed / 'seg.py'), '--resume',
                                  str(bad)]), ('test', [str(killed / 'seg.py'),
                                                        str(bad)])):
        with pytest.raises(SystemExit) as exit_info:
            load_tool(tool).main(argv + ['--work-dir', str(tmp_path / tool)])
        message = str(exit_info.value.code)
        assert str(bad) in message and f"record '{record.filename}' fails its CRC" in message


def _without_record(src: Path, dst: Path, drop_psa: bool = False) -> Path:
    """A copy of ``src`` without its PSA record (as older checkpoints); without the PSA
    tensors too (a stock checkpoint), if asked."""
    ckpt = read_checkpoint(src)
    ckpt['meta'].pop('psa')
    if drop_psa:
        ckpt['state_dict'] = {k: v for k, v in ckpt['state_dict'].items() if '.psa.' not in k}
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize('record', [True, False])
def test_psa_p_checkpoint_does_not_resume_as_psa_s(killed, tmp_path, load_tool, record):
    ckpt = killed / 'seg_killed' / 'iter_3.pth'
    assert read_checkpoint(ckpt)['meta']['psa'] == {
        'backbone':
        dict(variant='official', mode='parallel', stages=[False, True, True, True], blocks=9)
    }
    if not record:
        ckpt = _without_record(ckpt, tmp_path / 'old.pth')
    with _one_thread(), pytest.raises(SystemExit) as exit_info:
        load_tool('train').main([
            str(killed / 'seg.py'), '--work-dir',
            str(tmp_path / 'w'), '--resume',
            str(ckpt), '--cfg-options', 'model.backbone.psa.mode=sequential'
        ])
    message = str(exit_info.value.code)
    assert f'resume: checkpoint {str(ckpt)!r} does not hold the model' in message
    if record:
        assert "mode='parallel'" in message and "mode='sequential'" in message
    else:
        # without the record, the PSA tensors tell: psa_s's conv_up.N are missing, psa_p's
        # single conv_up is unexpected
        assert 'by its state_dict keys and shapes (no PSA record)' in message
        assert 'missing keys: backbone.stage2.0.branches.0.0.psa.conv_up.0.weight' in message
        assert 'unexpected keys: backbone.stage2.0.branches.0.0.psa.conv_up.weight' in message


def test_stock_checkpoint_is_tested_with_a_psa_config_only_on_purpose(killed, tmp_path, load_tool):
    stock = _without_record(killed / 'seg_killed' / 'iter_3.pth', tmp_path / 'stock.pth', True)
    argv = [str(killed / 'seg.py'), str(stock), '--work-dir', str(tmp_path / 'test')]
    with _one_thread(), pytest.raises(SystemExit) as exit_info:
        load_tool('test').main(argv)
    message = str(exit_info.value.code)
    assert str(stock) in message and '--allow-missing-psa' in message
    with _one_thread():
        load_tool('test').main(argv + [
            '--allow-missing-psa', '--cfg-options', 'experiment_name=seg-stock',
            'visualizer.name=seg-stock'
        ])
    assert 'mIoU' in ''.join(p.read_text() for p in (tmp_path / 'test').rglob('*.log'))
