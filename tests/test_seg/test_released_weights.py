"""Opt-in: a checkpoint of the released PSA network, converted, gives the released outputs.

Needs a checkout of the released code (https://github.com/DeLightCMU/PSA), named by the
environment variable ``PSA_OFFICIAL_REPO``; skipped without it:

    git clone https://github.com/DeLightCMU/PSA /path/to/PSA
    PSA_OFFICIAL_REPO=/path/to/PSA .venv/bin/python -m pytest -s -q \
        tests/test_seg/test_released_weights.py

For PSA_p and PSA_s, ``released_psa_net.py`` (its own process: the released code's top-level
``config``/``network``/``utils`` modules must not meet mmpsa's) builds the released
``MscaleOCR`` with random weights and BatchNorm statistics, saves it in the released checkpoint
format and records its outputs on one normalized batch. Here the checkpoint goes through
``convert_released_checkpoint``, loads strictly into the model of mmpsa's official config
(the fused PSA block, the default) and runs on the same batch: backbone features, class and
aux logits and scale attention at each scale (0.5, 1.0, 2.0), and the 3-scale logits of
``inference``, must equal the released ones within 1e-4 relative (max abs difference / max
abs of the reference, fp32), the argmax agreeing on >= 99.9 % of pixels (near-ties of random
weights may flip). ``-s`` prints the measured numbers.
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS

from mmpsa.checkpoint import read_checkpoint
from mmpsa.layers import PolarizedSelfAttention
from mmpsa.seg.released import convert_released_checkpoint

ENV = 'PSA_OFFICIAL_REPO'
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = HERE / 'released_psa_net.py'
CONFIGS = REPO / 'configs' / 'mmseg' / 'psa_mscale_ocrnet'
SIZE = (128, 256)  # multiples of 64: every scale of 0.5, 1.0, 2.0 is a multiple of 32
SEED = 0
REL_TOL = 1e-4
MIN_AGREEMENT = 0.999

pytestmark = pytest.mark.skipif(
    not os.environ.get(ENV),
    reason=f'opt-in: set {ENV} to a checkout of https://github.com/DeLightCMU/PSA, e.g. '
    f'`git clone https://github.com/DeLightCMU/PSA /tmp/PSA && {ENV}=/tmp/PSA '
    f'.venv/bin/python -m pytest -s -q tests/test_seg/test_released_weights.py` '
    f'(~1-2 min per variant on CPU)')


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    if ours.shape != ref.shape:
        raise AssertionError(f'shape {tuple(ours.shape)} != released {tuple(ref.shape)}')
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def argmax_agreement(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """The fraction of pixels whose class argmax is the same."""
    return (ours.argmax(dim=1) == ref.argmax(dim=1)).double().mean().item()


def build_official(config: Path) -> torch.nn.Module:
    """The eval-mode model of an official config, on CPU (SyncBN reverted to BN), with no
    pretrained weights."""
    cfg = Config.fromfile(str(config))
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    return revert_sync_batchnorm(model).eval()


@pytest.fixture(scope='module', params=['p', 's'])
def released(request, tmp_path_factory) -> Dict:
    """The released network's checkpoint and outputs for one variant, by the script."""
    variant = request.param
    out = tmp_path_factory.mktemp(f'released_psa_{variant}')
    options = dict(
        repo=os.environ[ENV], variant=variant, seed=SEED, out=out, threads=torch.get_num_threads())
    cmd = [sys.executable, str(SCRIPT), '--size', *map(str, SIZE)]
    for name, value in options.items():
        cmd += [f'--{name}', str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f'{" ".join(cmd)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    print(f'\n{proc.stdout.strip()}')
    outputs = torch.load(out / 'released_outputs.pt', map_location='cpu', weights_only=True)
    return dict(variant=variant, dir=out, checkpoint=out / 'released.pth', outputs=outputs)


@pytest.fixture(scope='module')
def converted(released) -> Dict:
    """The released checkpoint through mmpsa's converter, loaded strictly into the model of
    the variant's official config."""
    variant = released['variant']
    config = CONFIGS / f'psa-{variant}_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py'
    dst = released['dir'] / 'converted.pth'
    info = convert_released_checkpoint(str(released['checkpoint']), str(dst))
    assert info['variant'] == f'psa_{variant}'
    assert Path(info['config']).resolve() == config.resolve()
    released['checkpoint'].unlink()  # 300 MB; the outputs are what the tests read

    model = build_official(config)
    model.load_state_dict(read_checkpoint(str(dst))['state_dict'], strict=True)
    dst.unlink()
    return dict(model=model, info=info)


def test_converted_model_gives_the_released_outputs(released, converted):
    model, ref = converted['model'], released['outputs']
    blocks = [m for m in model.modules() if isinstance(m, PolarizedSelfAttention)]
    assert blocks and all(block.fused for block in blocks)  # the default, fused evaluation
    inputs = ref['input']
    assert tuple(inputs.shape[2:]) == SIZE

    features = {}
    hook = model.backbone.register_forward_hook(
        lambda module, args, out: features.__setitem__('backbone', out))
    errors, agreements, lines = {}, {}, []
    try:
        with torch.no_grad():
            for scale in ref['scales'].tolist():
                ours = model.scale_outputs(inputs, scale)
                # the released HRNet returns its 4 branches upsampled to the first and
                # concatenated, as mmseg's resize_concat heads read them
                branches = features['backbone']
                ours['backbone'] = torch.cat(
                    [branches[0]] + [
                        F.interpolate(
                            b, size=branches[0].shape[2:], mode='bilinear', align_corners=False)
                        for b in branches[1:]
                    ],
                    dim=1)
                for key in ('backbone', 'cls', 'aux', 'attn'):
                    errors[f'{scale}x {key}'] = relative_error(ours[key],
                                                               ref[f'scale_{scale}/{key}'])
                for key in ('cls', 'aux'):
                    agreements[f'{scale}x {key}'] = argmax_agreement(ours[key],
                                                                     ref[f'scale_{scale}/{key}'])
            metas = [dict(img_shape=SIZE, ori_shape=SIZE, pad_shape=SIZE)]
            combined = model.inference(inputs, metas)
    finally:
        hook.remove()
    errors['combined'] = relative_error(combined, ref['pred'])
    agreements['combined'] = argmax_agreement(combined, ref['pred'])

    print(f'\nreleased PSA_{released["variant"]} vs mmpsa (converted, fused block), '
          f'{SIZE[0]}x{SIZE[1]}, fp32, seed {SEED}:')
    for name, error in errors.items():
        agreement = agreements.get(name)
        lines.append(f'  {name:<14} max rel err {error:.2e}' + (
            f'   argmax agreement {100 * agreement:.3f} %' if agreement is not None else ''))
    print('\n'.join(lines))
    worst = {name: error for name, error in errors.items() if not error <= REL_TOL}
    assert not worst, f'relative error above {REL_TOL}: {worst}'
    low = {name: a for name, a in agreements.items() if not a >= MIN_AGREEMENT}
    assert not low, f'argmax agreement below {MIN_AGREEMENT}: {low}'
