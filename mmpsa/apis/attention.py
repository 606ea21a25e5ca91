"""See what PSA attends to: capture ``a_ch`` / ``a_sp`` through the block's hook points.

Every :class:`~mmpsa.layers.PolarizedSelfAttention` passes its channel attention
``a_ch`` (B, C, 1, 1) and spatial attention ``a_sp`` (B, 1, H, W) through two identity
children, ``ch_attn`` and ``sp_attn``. Forward hooks on them read the maps without
editing the model; a forward pre-hook on the backbone reads the image the network
actually saw (after resizing / the top-down affine crop), which is what the spatial maps
are overlaid on.
"""
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpsa.layers import PolarizedSelfAttention


def psa_blocks(model: nn.Module) -> Dict[str, PolarizedSelfAttention]:
    """All PSA blocks of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PolarizedSelfAttention)}


def select_blocks(names: Sequence[str], pattern: Optional[str] = None, num: int = 4) -> List[str]:
    """Pick the blocks to draw.

    Args:
        names: All PSA block names, in module order.
        pattern: A regular expression; blocks whose name matches are taken.
        num: Without ``pattern``, this many blocks evenly spread over the network.

    Returns:
        The chosen names, in module order.
    """
    if not names:
        raise ValueError('the model has no PolarizedSelfAttention block')
    if pattern is not None:
        chosen = [n for n in names if re.search(pattern, n)]
        if not chosen:
            raise ValueError(f'--blocks {pattern!r} matches no PSA block; '
                             f'first names: {list(names)[:5]}')
        return chosen
    if num < 1:
        raise ValueError(f'num must be >= 1, got {num!r}')
    idx = np.unique(np.linspace(0, len(names) - 1, min(num, len(names))).round().astype(int))
    return [names[i] for i in idx]


@contextmanager
def capture_attention(model: nn.Module,
                      names: Sequence[str]) -> Iterator[Dict[str, Dict[str, torch.Tensor]]]:
    """Record ``a_ch``, ``a_sp`` of the named blocks and the backbone input.

    Yields a dict filled during the forward passes run inside the ``with``:
    ``maps[block] = {'a_ch': (B, C, 1, 1), 'a_sp': (B, 1, H, W)}`` and
    ``maps['__input__'] = {'image': (B, 3, H, W)}`` (the backbone's input).
    """
    blocks = psa_blocks(model)
    maps: Dict[str, Dict[str, torch.Tensor]] = {}
    handles = []

    def keep(block: str, key: str):

        def hook(_module, _inputs, output):
            maps.setdefault(block, {})[key] = output.detach().float().cpu()

        return hook

    for name in names:
        if name not in blocks:
            raise KeyError(f'no PSA block named {name!r}')
        handles.append(blocks[name].ch_attn.register_forward_hook(keep(name, 'a_ch')))
        handles.append(blocks[name].sp_attn.register_forward_hook(keep(name, 'a_sp')))
    backbone = getattr(model, 'backbone', None)
    if backbone is not None:

        def keep_input(_module, args):
            maps['__input__'] = {'image': args[0].detach().float().cpu()}

        handles.append(backbone.register_forward_pre_hook(keep_input))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def _denormalize(image: torch.Tensor, model: nn.Module) -> np.ndarray:
    """(3, H, W) network input -> (H, W, 3) uint8 RGB, undoing the preprocessor."""
    pre = getattr(model, 'data_preprocessor', None)
    img = image.clone()
    mean, std = getattr(pre, 'mean', None), getattr(pre, 'std', None)
    if mean is not None and std is not None:
        img = img * std.view(-1, 1, 1).cpu() + mean.view(-1, 1, 1).cpu()
    img = img.permute(1, 2, 0).numpy()
    # The preprocessors convert BGR to RGB before normalising; show it as RGB.
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_attention(image: np.ndarray,
                   maps: Dict[str, Dict[str, torch.Tensor]],
                   names: Sequence[str],
                   out_file: Path,
                   title: str = '') -> Path:
    """Write one PNG: per block, ``a_sp`` over the image and the ``a_ch`` strip.

    Args:
        image: (H, W, 3) uint8 RGB, the network input.
        maps: From :func:`capture_attention` (batch index 0 is drawn).
        names: The blocks to draw, one row each.
        out_file: The PNG to write.
        title: A figure title.

    Returns:
        ``out_file``.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = len(names)
    fig, axes = plt.subplots(
        rows, 2, figsize=(9, 2.6 * rows), squeeze=False, gridspec_kw=dict(width_ratios=[1.4, 1]))
    h, w = image.shape[:2]
    for row, name in enumerate(names):
        a_sp = maps[name]['a_sp'][0:1]
        a_sp = F.interpolate(a_sp, size=(h, w), mode='bilinear', align_corners=False)[0, 0]
        ax = axes[row][0]
        ax.imshow(image)
        im = ax.imshow(a_sp.numpy(), cmap='jet', alpha=0.5)
        ax.set_title(f'{name}: a_sp [{a_sp.min():.2f}, {a_sp.max():.2f}]', fontsize=8)
        ax.axis('off')
        fig.colorbar(im, ax=ax, fraction=0.03, format='%.4g')
        a_ch = maps[name]['a_ch'][0, :, 0, 0].numpy()
        ax = axes[row][1]
        im = ax.imshow(a_ch[None, :], cmap='viridis', aspect='auto')
        ax.set_title(f'a_ch, C={a_ch.size} [{a_ch.min():.3f}, {a_ch.max():.3f}]', fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05, format='%.4g')
        ax.set_yticks([])
        ax.set_xlabel('channel')
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=80)
    plt.close(fig)
    return out_file


def visualize_attention(config,
                        checkpoint: Optional[str],
                        images: Sequence[str],
                        out_dir: str,
                        blocks: Optional[str] = None,
                        num_blocks: int = 4,
                        device: str = 'cpu',
                        allow_missing_psa: bool = False) -> List[Path]:
    """Run a seg or pose model on images and draw its PSA attention maps.

    Args:
        config: A config path or :class:`mmengine.config.Config` (mmseg or mmpose scope).
        checkpoint: Weights to load (``None``: the model's own init).
        images: Image files.
        out_dir: Where the PNGs go (``<image stem>_attention.png``).
        blocks: A regular expression selecting blocks by name (default: spread).
        num_blocks: Without ``blocks``, how many blocks to draw.
        device: Torch device.
        allow_missing_psa: A stock checkpoint for a PSA config is meant (the blocks draw
            their initialisation).

    Returns:
        The written files.
    """
    import mmpsa  # noqa: F401  (registers the PSA models)
    from mmpsa.checkpoint import build_model, scope_of
    scope = scope_of(config)
    model = build_model(
        config, checkpoint, purpose='attention', device=device, allow_missing_psa=allow_missing_psa)
    if scope == 'mmseg':
        from mmseg.apis import inference_model
        run = lambda img: inference_model(model, img)  # noqa: E731
    else:
        from mmpose.apis import inference_topdown
        run = lambda img: inference_topdown(model, img)  # noqa: E731
    names = select_blocks(list(psa_blocks(model)), blocks, num_blocks)
    written = []
    for path in images:
        if not Path(path).is_file():
            raise FileNotFoundError(f'image not found: {path!r}')
        with capture_attention(model, names) as maps:
            with torch.no_grad():
                run(str(path))
        image = _denormalize(maps['__input__']['image'][0], model)
        out = Path(out_dir) / f'{Path(path).stem}_attention.png'
        written.append(
            draw_attention(image, maps, names, out, title=f'{Path(path).name} ({scope})'))
    return written
