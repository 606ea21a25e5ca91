"""End to end through mmseg: tiny PSA models trained, validated, saved, resumed, tested,
trained by ``mim train`` as users run it, and used through ``mmseg.apis``."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from mmpsa.apis.runner import test as run_test_tool
from mmpsa.checkpoint import read_checkpoint
from mmpsa.datasets.cityscapes_tiny import USED_CLASSES

REPO = Path(__file__).resolve().parents[2]
MODELS = ('hrnet', 'deeplabv3plus')
# chance for a model that knows nothing: one of the classes present, per pixel
CHANCE_MIOU = 100.0 / len(USED_CLASSES)


@pytest.mark.parametrize('name', MODELS)
def test_tiny_psa_model_learns(tiny_run, name):
    run = tiny_run(name)
    miou = run.val_metrics['mIoU']  # mmseg's IoUMetric, in percent
    assert miou > 40.0 and miou > 3 * CHANCE_MIOU, run.val_metrics


@pytest.mark.parametrize('name', MODELS)
def test_resume_continues_from_the_saved_state(tiny_run, name):
    run = tiny_run(name)
    assert run.resumed_from_iter == run.mid_iter  # not 0: the second Runner resumed
    assert run.resumed_state_matches  # ... with exactly the weights saved at mid_iter
    assert f'iter_{run.mid_iter}.pth' in run.checkpoints
    assert f'iter_{run.max_iters}.pth' in run.checkpoints
    last = (run.work_dir / 'last_checkpoint').read_text().strip()
    assert Path(last).name == f'iter_{run.max_iters}.pth'


@pytest.mark.parametrize('name', MODELS)
def test_testing_the_checkpoint_reproduces_validation(tiny_run, make_tiny_cfg, tiny_data_root,
                                                      tmp_path, name):
    """``tools/test.py``'s path -- a new Runner built from the config, loading the saved
    checkpoint -- gets the mIoU the training Runner validated at its last iteration."""
    run = tiny_run(name)  # the test split of the tiny configs is the val split
    cfg = make_tiny_cfg(run.config, tiny_data_root, tmp_path, run.max_iters)
    checkpoint = run.work_dir / f'iter_{run.max_iters}.pth'
    metrics = run_test_tool(cfg, str(checkpoint), work_dir=str(tmp_path))
    assert metrics['mIoU'] == pytest.approx(run.val_metrics['mIoU'], abs=1e-6)


def test_init_model_and_inference_model(tiny_run, tiny_data_root):
    from mmseg.apis import inference_model, init_model

    run = tiny_run('hrnet')
    model = init_model(run.cfg, str(run.work_dir / f'iter_{run.max_iters}.pth'), device='cpu')
    img = sorted((tiny_data_root / 'leftImg8bit' / 'val').rglob('*_leftImg8bit.png'))[0]
    rel = img.relative_to(tiny_data_root / 'leftImg8bit')
    seg = tiny_data_root / 'gtFine' / rel.parent / rel.name.replace('_leftImg8bit.png',
                                                                    '_gtFine_labelTrainIds.png')
    gt = cv2.imread(str(seg), cv2.IMREAD_UNCHANGED)
    result = inference_model(model, str(img))
    pred = result.pred_sem_seg.data[0].numpy()
    assert pred.shape == gt.shape
    valid = gt != 255
    accuracy = float((pred[valid] == gt[valid]).mean())
    assert accuracy > 0.7, accuracy  # a model that knows nothing gets ~1/9


def test_mim_train_runs_the_psa_config(tiny_data_root, tmp_path):
    mim = Path(sys.executable).with_name('mim')
    assert mim.exists(), f'openmim is a test requirement; {mim} is missing'
    config = REPO / 'configs/mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
    work_dir = tmp_path / 'work'
    options = [
        f'{loader}.dataset.data_root={tiny_data_root}'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ]
    options += [
        'train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2'
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS='1',
        PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    proc = subprocess.run([
        str(mim), 'train', 'mmseg',
        str(config), '--gpus', '0', '--work-dir',
        str(work_dir), '--cfg-options', *options
    ],
                          cwd=tmp_path,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work_dir / 'iter_2.pth').exists()
    logs = list(work_dir.rglob('*.log'))
    assert logs and any('mIoU' in p.read_text() for p in logs)
    assert any('PSAHRNet' in p.read_text() for p in logs)  # the PSA backbone was built


def test_checkpoints_hold_trained_psa_weights(tiny_run):
    import torch

    run = tiny_run('deeplabv3plus')
    mid, last = (
        read_checkpoint(run.work_dir / f'iter_{i}.pth')['state_dict']
        for i in (run.mid_iter, run.max_iters))
    keys = [k for k in last if '.psa.' in k]
    assert any(k.startswith('backbone.layer1.0.psa.') for k in keys)
    assert any(k.startswith('backbone.layer4.1.psa.') for k in keys)
    assert any(not torch.equal(mid[k], last[k]) for k in keys)  # the PSAs train
