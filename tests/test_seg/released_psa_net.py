"""Run the released PSA segmentation network (DeLightCMU/PSA) on CPU and save its outputs.

The reference side of ``test_released_weights.py``, run as its own process: the released code
has top-level modules named ``config``, ``network`` and ``utils``, which must not meet mmpsa's
imports. It never imports mmpsa.

    python tests/test_seg/released_psa_net.py --repo REPO --variant p|s --size H W \
        --seed N --out DIR

builds the released ``MscaleOCR`` (``network.ocrnet.HRNet_Mscale``: HRNetV2-W48 with PSA_p or
PSA_s in every BasicBlock, the OCR block and ``scale_attn``) in eval mode, gives every weight
and every BatchNorm running statistic a random value drawn from ``--seed``, and writes

* ``DIR/released.pth``: the checkpoint in the released format (``state_dict`` with ``module.``
  keys beside ``epoch``, ``arch``, ``optimizer``, an ``np.float64`` ``mean_iu`` and ``command``);
* ``DIR/released_outputs.pt``: a flat dict of tensors -- ``input`` (the normalized batch),
  ``scale_{s}/{cls,aux,attn,x,backbone,ocr_feats}`` for s in 0.5, 1.0, 2.0 (what the released
  ``_fwd`` returned for the batch resized as ``nscale_forward`` resizes it, that resized batch,
  and the backbone's and OCR block's features), ``pred`` (``nscale_forward``'s combined logits)
  and ``scales``.

The released code needs stand-ins for what a CPU checkout lacks (apex, runx, its ``utils``
package, ``np.int``); they are written here and installed in ``sys.modules`` before it is
imported.
"""
import argparse
import math
import sys
import types
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

SCALES = (0.5, 1.0, 2.0)
ARCH = 'network.ocrnet.HRNet_Mscale'
NUM_CLASSES = 19
# the released normalization (config.py DATASET.MEAN/STD, on [0, 1] pixels)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class AttrDict(dict):
    """Stand-in for the released ``utils.attr_dict.AttrDict``: a dict read and written by
    attribute, which ``immutable(True)`` freezes (nested AttrDicts too)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__['_immutable'] = False

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__['_immutable']:
            raise AttributeError(f'AttrDict is immutable; cannot set {name!r}')
        self[name] = value

    def immutable(self, flag: bool) -> None:
        """Freeze (``True``) or unfreeze this dict and every AttrDict inside it."""
        self.__dict__['_immutable'] = flag
        for value in self.values():
            if isinstance(value, AttrDict):
                value.immutable(flag)

    def is_immutable(self) -> bool:
        return self.__dict__['_immutable']


def fmt_scale(prefix: str, scale: float) -> str:
    """Stand-in for ``utils.misc.fmt_scale``: ``('pred', 0.5)`` -> ``'pred_05x'``."""
    return f'{prefix}_{str(float(scale)).replace(".", "")}x'


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install_stand_ins() -> None:
    """Put apex, runx and the released ``utils`` package into ``sys.modules``, and ``np.int``
    back into numpy (removed in numpy 1.24; the released hrnetv2 calls it)."""
    amp = _module('apex.amp', float_function=lambda fn: fn)
    parallel = _module('apex.parallel', SyncBatchNorm=nn.BatchNorm2d)
    _module('apex', amp=amp, parallel=parallel, __path__=[])
    logx = types.SimpleNamespace(msg=lambda *args, **kwargs: None)
    runx_logx = _module('runx.logx', logx=logx)
    _module('runx', logx=runx_logx, __path__=[])
    attr_dict = _module('utils.attr_dict', AttrDict=AttrDict)
    misc = _module('utils.misc', fmt_scale=fmt_scale)
    _module('utils', attr_dict=attr_dict, misc=misc, __path__=[])
    np.int = int


def build_released(repo: Path, variant: str) -> nn.Module:
    """The released ``MscaleOCR`` (HRNetV2-W48 + OCR + scale_attn) with PSA_p or PSA_s.

    Args:
        repo: a checkout of DeLightCMU/PSA, or its ``semantic-segmentation`` folder.
        variant: ``'p'`` (PSA_p) or ``'s'`` (PSA_s, what the released hrnetv2.py builds).
    """
    root = repo / 'semantic-segmentation' if (repo / 'semantic-segmentation').is_dir() else repo
    if not (root / 'network' / 'ocrnet.py').is_file():
        raise ValueError(f'--repo: no semantic-segmentation/network/ocrnet.py under {repo}')
    install_stand_ins()
    sys.path.insert(0, str(root))

    from config import cfg  # the released config, after the stand-ins
    cfg.MODEL.BNFUNC = nn.BatchNorm2d
    cfg.MODEL.HRNET_CHECKPOINT = ''  # bound as a default argument when hrnetv2 is imported
    cfg.OPTIONS.TORCH_VERSION = float('.'.join(torch.__version__.split('.')[:2]))
    cfg.DATASET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.N_SCALES = list(SCALES)

    import network.hrnetv2 as hrnetv2
    if variant == 'p':
        hrnetv2.PSA_s = hrnetv2.PSA_p  # BasicBlock builds whatever PSA_s names
    from network.ocrnet import MscaleOCR

    model = MscaleOCR(num_classes=NUM_CLASSES, trunk='hrnetv2')  # get_net would call .cuda()
    return model.eval()


def randomize_(model: nn.Module, seed: int, calibration: torch.Tensor) -> None:
    """Give every parameter and BatchNorm statistic a random value drawn from ``seed``.

    Convolutions N(0, 1/fan_in), their biases N(0, 0.1); BatchNorm / LayerNorm weights
    U(0.5, 1.5), biases N(0, 0.1). BatchNorm statistics are drawn relative to the data, in one
    forward pass of ``_fwd`` on the ``calibration`` batch (see :func:`calibration_batch`):
    with m and p the per-channel mean and mean square of a BatchNorm's input there,
    running_mean = m + sqrt(p) * N(0, 0.1) and running_var = p * U(0.5, 1.5), so every
    BatchNorm roughly normalizes, off by a random amount.

    Why: with statistics unrelated to the data, the HRNet's residual sums grow the activations
    ~1e5-fold, every softmax and the scale attention saturate and one class wins everywhere,
    which would test little. The mean square rather than the variance, and a batch of several
    images rather than the input alone, because the OCR's 19 object features barely vary on
    one image: statistics fitted to them blow the other scales' features up 10-fold.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.BatchNorm2d, nn.LayerNorm)
    batch_norms = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, 1 / math.sqrt(fan_in), generator=gen)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1, generator=gen)
            elif isinstance(module, norms):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
                if isinstance(module, nn.BatchNorm2d):
                    # relative to the data's statistics, applied by the calibration pass
                    module.running_mean.normal_(0, 0.1, generator=gen)
                    module.running_var.uniform_(0.5, 1.5, generator=gen)
                    module.num_batches_tracked.fill_(1000)
                    batch_norms.append(module)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f'no randomization for {type(module).__name__}')

    calibrated = set()

    def set_statistics(norm: nn.BatchNorm2d, args) -> None:
        x = args[0].transpose(0, 1).flatten(1)  # (C, N*H*W)
        power = x.square().mean(dim=1).clamp_min(1e-2)
        norm.running_mean.mul_(power.sqrt()).add_(x.mean(dim=1))
        norm.running_var.mul_(power)
        calibrated.add(norm)

    hooks = [norm.register_forward_pre_hook(set_statistics) for norm in batch_norms]
    try:
        with torch.no_grad():
            model._fwd(calibration)
    finally:
        for hook in hooks:
            hook.remove()
    if len(calibrated) != len(batch_norms):
        raise RuntimeError(f'{len(batch_norms) - len(calibrated)} BatchNorms did not run')


def released_checkpoint(model: nn.Module, command: str) -> dict:
    """``model`` as the released training script (runx ``logx.save_model``) saves it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    state_dict = {'module.' + k: v for k, v in model.state_dict().items()}  # DDP-wrapped
    return {
        'state_dict': state_dict,
        'epoch': 1,
        'arch': ARCH,
        'optimizer': optimizer.state_dict(),
        'mean_iu': np.float64(0.8695),
        'command': command,
    }


def make_input(height: int, width: int, seed: int) -> torch.Tensor:
    """A (1, 3, H, W) normalized image: smooth random colour regions plus pixel noise in
    [0, 255], normalized as the released loader does."""
    gen = torch.Generator().manual_seed(seed + 1)
    coarse = torch.rand(1, 3, max(height // 16, 1), max(width // 16, 1), generator=gen)
    image = nn.functional.interpolate(
        coarse, size=(height, width), mode='bilinear', align_corners=False)
    image = image * 0.8 + 0.2 * torch.rand(1, 3, height, width, generator=gen)
    image = torch.round(image * 255) / 255
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (image - mean) / std


def calibration_batch(inputs: torch.Tensor, seed: int) -> torch.Tensor:
    """The batch :func:`randomize_` fits the BatchNorm statistics to: ``inputs``, ``inputs``
    blurred by a 0.5x down- and up-sampling (the detail of the other scales), and two more
    images from :func:`make_input`."""
    height, width = inputs.shape[2:]
    blurred = nn.functional.interpolate(
        nn.functional.interpolate(inputs, scale_factor=0.5, mode='bilinear', align_corners=False),
        size=(height, width),
        mode='bilinear',
        align_corners=False)
    others = [make_input(height, width, seed=seed + 1000 * k) for k in (1, 2)]
    return torch.cat([inputs, blurred] + others)


def run_released(model: nn.Module, inputs: torch.Tensor,
                 scales: Sequence[float]) -> Dict[str, torch.Tensor]:
    """``nscale_forward`` over ``scales``, recording what ``_fwd`` returns at each scale.

    ``_fwd`` is wrapped on the instance, so each scale's outputs are those of the very call
    ``nscale_forward`` combines, on the batch it resized (with ``ResizeX``).
    """
    recorded: List[Dict[str, torch.Tensor]] = []
    features: Dict[str, torch.Tensor] = {}
    fwd = model._fwd

    def recording_fwd(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outs = fwd(x)
        recorded.append(
            dict(
                x=x,
                backbone=features['backbone'],
                ocr_feats=features['ocr'],
                cls=outs['cls_out'],
                aux=outs['aux_out'],
                attn=outs['logit_attn']))
        return outs

    hooks = [
        model.backbone.register_forward_hook(
            lambda mod, args, out: features.__setitem__('backbone', out[2])),
        model.ocr.register_forward_hook(lambda mod, args, out: features.__setitem__('ocr', out[2])),
    ]
    model._fwd = recording_fwd
    try:
        with torch.no_grad():
            output = model.nscale_forward({'images': inputs}, list(scales))
    finally:
        del model._fwd
        for hook in hooks:
            hook.remove()

    order = sorted(scales, reverse=True)  # nscale_forward runs the highest scale first
    if len(recorded) != len(order):
        raise RuntimeError(f'_fwd ran {len(recorded)} times for scales {order}')
    result = {'input': inputs, 'pred': output['pred'], 'scales': torch.tensor(order)}
    for scale, outs in zip(order, recorded):
        if not torch.equal(outs['cls'], output[fmt_scale('pred', scale)]):
            raise RuntimeError(f'the recorded cls at scale {scale} is not nscale_forward\'s')
        for name, value in outs.items():
            result[f'scale_{scale}/{name}'] = value.detach().clone().contiguous()
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--repo', type=Path, required=True, help='a checkout of https://github.com/DeLightCMU/PSA')
    parser.add_argument('--variant', choices=('p', 's'), required=True)
    parser.add_argument('--size', type=int, nargs=2, default=(128, 256), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    args = parser.parse_args(argv)
    for name, value in zip(('H', 'W'), args.size):
        if value <= 0 or value % 64:
            raise ValueError(f'--size {name} must be a positive multiple of 64 (every scale a '
                             f'multiple of 32), got {value!r}')
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the released constructors draw their own init first
    model = build_released(args.repo, args.variant)
    inputs = make_input(*args.size, seed=args.seed)
    randomize_(model, args.seed, calibration=calibration_batch(inputs, args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    command = ' '.join(['released_psa_net.py'] + list(sys.argv[1:] if argv is None else argv))
    torch.save(released_checkpoint(model, command), args.out / 'released.pth')

    outputs = run_released(model, inputs, SCALES)
    torch.save(outputs, args.out / 'released_outputs.pt')
    num_params = sum(p.numel() for p in model.parameters())
    print(f'released MscaleOCR PSA_{args.variant}: {len(model.state_dict())} tensors, '
          f'{num_params / 1e6:.2f} M parameters; outputs at {args.size[0]}x{args.size[1]}, '
          f'scales {SCALES} -> {args.out}')


if __name__ == '__main__':
    main()
