"""Put a Polarized Self-Attention into every residual block of a built backbone.

One mechanism for mmseg's and mmpose's ResNet and HRNet (and timm's) alike (it imports
none of them, nor mmengine): the PSA goes after the first 3x3 conv + norm + ReLU of each
residual block, i.e. it becomes the input of the block's next conv -- ``conv2`` of a BasicBlock,
``conv3`` of a Bottleneck (`Polarized Self-Attention <https://arxiv.org/abs/2107.00782>`_).

- The block is a child named ``psa`` of its residual block (``layer1.0.psa.ch_wv.weight``,
  ``stage2.0.branches.0.0.psa.ch_wv.weight``), so stock checkpoints load with only ``psa``
  keys missing.
- It is fed by a forward pre-hook on that next conv, bound to the ``psa`` child
  (``functools.partial`` of a module-level function): the hook follows ``copy.deepcopy``
  (EMA) and pickling, and runs inside ``torch.utils.checkpoint`` (``with_cp=True``) and
  ``torch.jit.trace``. The block's own forward code is left untouched.
- Only the residual-stage containers are walked (a ResNet's ``res_layers``; an HRNet's
  ``layer1`` and the ``branches`` of ``stage2..4``): the HRNet root has a ``conv1`` and a
  ``conv2`` of its own. A residual block is recognised by structure: ``conv2`` and
  ``conv3`` make a Bottleneck, ``conv2`` alone a BasicBlock.

:class:`PSABackboneMixin` turns a stock backbone class into a PSA one: the stock
``__init__``, then :func:`insert_psa`; each ``psa`` is (re)initialised after the
backbone's own ``init_weights``; stage freezing leaves the ``psa`` children alone.
"""
import copy
import functools
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .layers import PSA_DEFAULTS, PolarizedSelfAttention, check_psa_cfg

#: The keys a backbone's ``psa=dict(...)`` accepts: the block's arguments and ``stages``.
PSA_KEYS = (*PSA_DEFAULTS, 'stages')


def _next_conv_name(module: nn.Module) -> Optional[str]:
    """Name of the conv a PSA feeds in ``module``, or None if it is no residual block."""
    if not isinstance(getattr(module, 'conv2', None), nn.Module):
        return None
    return 'conv3' if isinstance(getattr(module, 'conv3', None), nn.Module) else 'conv2'


def _blocks_in(container: nn.Module) -> Iterator[nn.Module]:
    """Yield the residual blocks inside a stage container, in order, not inside blocks."""
    for child in container.children():
        if _next_conv_name(child) is not None:
            yield child
        else:
            yield from _blocks_in(child)


def residual_stages(backbone: nn.Module) -> List[List[nn.Module]]:
    """The residual blocks of each stage of a ResNet or an HRNet, stage by stage.

    A ResNet's stages are the modules named in its ``res_layers`` (``layer1..``); an
    HRNet's are ``layer1`` (stage 1) and the ``branches`` of every module of ``stage2``,
    ``stage3``, ``stage4`` (their fuse layers and the transitions are not walked).

    Args:
        backbone: A built backbone.

    Returns:
        One list of blocks per stage.
    """
    res_layers = getattr(backbone, 'res_layers', None)
    if isinstance(res_layers, (list, tuple)) and res_layers:
        containers = [[getattr(backbone, name)] for name in res_layers]
    elif all(
            isinstance(getattr(backbone, name, None), nn.Module)
            for name in ('layer1', 'stage2', 'stage3', 'stage4')):
        containers = [[backbone.layer1]]
        for i in (2, 3, 4):
            containers.append([
                branch for hr_module in getattr(backbone, f'stage{i}')
                for branch in getattr(hr_module, 'branches', ())
            ])
    else:
        raise ValueError(f'psa: {type(backbone).__name__} has no residual stages (a ResNet with '
                         f'`res_layers` or an HRNet with layer1/stage2-4), got {type(backbone)!r}')
    return [[block for c in stage for block in _blocks_in(c)] for stage in containers]


def backbone_out_channels(backbone: nn.Module) -> Optional[List[int]]:
    """Channels of the feature maps a built ResNet or HRNet returns, in order.

    Read from the structure (mmseg's and mmpose's classes alike, PSA subclasses included):
    a ResNet appends layer ``i``'s output when ``i`` is in ``out_indices``; an HRNet returns
    the branches of its last module (all of them, or the first, by ``multiscale_output``).
    ``None`` for any other backbone, whose outputs are then checked at the first forward.

    Args:
        backbone: A built backbone.
    """
    res_layers = getattr(backbone, 'res_layers', None)
    if isinstance(res_layers, (list, tuple)) and res_layers and hasattr(backbone, 'out_indices'):
        # mmpose keeps the block expansion on the backbone, mmseg on the block class
        expansion = getattr(backbone, 'expansion', None) or getattr(backbone.block, 'expansion', 1)
        base = getattr(backbone, 'base_channels', 64)
        return [
            base * 2**i * expansion for i in range(len(res_layers)) if i in backbone.out_indices
        ]
    stage4 = getattr(backbone, 'stage4', None)
    if isinstance(stage4, nn.Sequential) and len(stage4) and hasattr(stage4[-1], 'in_channels'):
        last = stage4[-1]  # its in_channels already include the block expansion
        return list(last.in_channels) if last.multiscale_output else [last.in_channels[0]]
    return None


def parse_psa_cfg(psa: Any, num_stages: int, owner: str = 'backbone') -> Dict[str, Any]:
    """Check a backbone's ``psa`` argument and fill in its defaults.

    Args:
        psa: ``dict(mode='parallel', variant='paper', stages=None, fused=True)``; any
            subset of these keys (the block's keys and defaults:
            :func:`~mmpsa.layers.check_psa_cfg`).
        num_stages: Stages of the backbone (``stages`` holds one bool per stage).
        owner: The backbone's class name, for messages.

    Returns:
        The full config with ``stages`` as a tuple of bools.
    """
    cfg = check_psa_cfg(psa, owner, extra_keys=('stages', ))
    stages = cfg.get('stages')
    if stages is None:
        stages = (True, ) * num_stages
    if not isinstance(stages, (tuple, list)):
        raise ValueError(f'psa.stages must be a tuple of {num_stages} bools, '
                         f'got {stages!r}')
    if len(stages) != num_stages:
        raise ValueError(f'psa.stages must hold one bool per stage ({num_stages}), '
                         f'got {stages!r}')
    for flag in stages:
        if not isinstance(flag, bool):
            raise ValueError(f'psa.stages entries must be bool, got {flag!r} in '
                             f'{stages!r}')
    if not any(stages):
        raise ValueError(f'psa.stages selects no stage (use psa=None for the stock '
                         f'backbone), got {stages!r}')
    return {**cfg, 'stages': tuple(stages)}


def _feed_psa(psa: nn.Module, conv: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Forward pre-hook of a block's next conv: its input passes through ``psa`` first."""
    return (psa(args[0]), ) + tuple(args[1:])


def _width_message(backbone: nn.Module, index: int, channels: int, err: ValueError) -> str:
    """A block width the PSA refuses, named by stage (and HRNet's ``num_channels``)."""
    name = type(backbone).__name__
    stage_cfg = (getattr(backbone, 'extra', None) or {}).get(f'stage{index + 1}')
    if isinstance(stage_cfg, Mapping) and 'num_channels' in stage_cfg:
        where = (f'extra.stage{index + 1}.num_channels={tuple(stage_cfg["num_channels"])!r} '
                 f'gives a residual block {channels} channels')
    else:
        where = f'a residual block of stage {index + 1} has {channels} channels'
    return (f'psa: {name}: {where}, which the PSA block refuses ({err}); change those widths '
            f'or leave stage {index + 1} out with psa.stages')


def insert_psa(backbone: nn.Module, psa: Mapping[str, Any]) -> List[str]:
    """Put a ``PolarizedSelfAttention`` into every residual block of the chosen stages.

    Each block gets a child ``psa`` whose ``in_channels`` are the input channels of the
    block's next conv (``conv2`` of a BasicBlock, ``conv3`` of a Bottleneck), fed by a
    forward pre-hook on that conv.

    Args:
        backbone: A built ResNet or HRNet (mmseg's or mmpose's); changed in place.
        psa: ``dict(mode, variant, stages, fused)``, see :func:`parse_psa_cfg`.
            ``stages`` holds one bool per stage: ``len(res_layers)`` for a ResNet, 4 for
            an HRNet (stage 1 is ``layer1``); default every stage.

    Returns:
        The qualified names of the inserted ``psa`` modules.
    """
    stages = residual_stages(backbone)
    cfg = parse_psa_cfg(psa, len(stages), type(backbone).__name__)
    if not any(stages):
        raise ValueError(f'psa: {type(backbone).__name__} has no residual blocks '
                         f'(no module with conv2) in its stages, got {type(backbone)!r}')
    block_cfg = {key: value for key, value in cfg.items() if key != 'stages'}
    inserted = []
    for index, (selected, blocks) in enumerate(zip(cfg['stages'], stages)):
        if not selected:
            continue
        for block in blocks:
            if hasattr(block, 'psa'):
                raise ValueError(f'psa: block {type(block).__name__} already has a '
                                 f'`psa` attribute, got {block.psa!r}')
            conv = getattr(block, _next_conv_name(block))
            try:
                layer = PolarizedSelfAttention(conv.in_channels, **block_cfg)
            except ValueError as err:
                raise ValueError(_width_message(backbone, index, conv.in_channels, err)) from err
            weight = next(conv.parameters(), None)
            if weight is not None:
                layer.to(device=weight.device, dtype=weight.dtype)
            block.add_module('psa', layer)
            conv.register_forward_pre_hook(functools.partial(_feed_psa, layer))
            inserted.append(block)
    names = {id(m): name for name, m in backbone.named_modules()}
    return [f'{names[id(block)]}.psa' for block in inserted]


def psa_modules(module: nn.Module) -> List[nn.Module]:
    """All ``PolarizedSelfAttention`` modules in ``module``, in registration order."""
    return [m for m in module.modules() if isinstance(m, PolarizedSelfAttention)]


def init_psa(module: nn.Module, seed: int) -> None:
    """Re-apply each PSA's own initialisation, drawing from a generator seeded ``seed``.

    The global RNG states are left as they were. Seeding makes the PSAs independent of
    how many numbers the backbone's own initialisation drew, so one config and one seed
    give the same PSAs under mmseg's and mmpose's backbones.

    Args:
        module: A module holding PSAs.
        seed: Seed for the CPU generator and the CUDA generators of the PSAs' devices.
    """
    layers = psa_modules(module)
    cuda_ids = sorted(
        {p.device.index
         for m in layers
         for p in m.parameters() if p.device.type == 'cuda'})
    with torch.random.fork_rng(devices=cuda_ids):
        torch.default_generator.manual_seed(seed)
        for i in cuda_ids:
            torch.cuda.default_generators[i].manual_seed(seed)
        for layer in layers:
            layer.init_weights()


def _is_pretrained(cfg: Any) -> bool:
    """Whether an ``init_cfg`` entry loads a checkpoint (mmengine applies those last)."""
    if not isinstance(cfg, Mapping):
        return False
    kind = cfg.get('type')
    return getattr(kind, '__name__', kind) in ('Pretrained', 'PretrainedInit')


class PSABackboneMixin:
    """Adds ``psa=dict(mode, variant, stages, fused)`` to a stock ResNet or HRNet class.

    Use as ``class PSAHRNet(PSABackboneMixin, HRNet)``: the stock ``__init__`` runs with
    every stock argument, then :func:`insert_psa` puts a PSA into each residual block of
    the selected stages. ``psa=None`` is the stock backbone, bit for bit.

    - ``init_weights``: the stock initialisation (``init_cfg``), then each ``psa``'s own
      initialisation (mmpose's HRNet ``init_cfg``, Normal(std=0.001) on every Conv2d,
      would otherwise overwrite the PSA convs), then a ``Pretrained`` entry of ``init_cfg``
      is loaded once more so that a checkpoint holding ``psa`` weights keeps them (a stock
      checkpoint leaves the PSAs at their own init).
    - Frozen stages: the stock ``_freeze_stages`` (run in ``__init__`` and in every
      ``train()``) freezes whole stages; the ``psa`` children keep their ``requires_grad``
      and train/eval mode, so a PSA is never frozen at its random init.
    """

    def __init__(self, *args: Any, psa: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if psa is not None:
            insert_psa(self, psa)
        self.psa_cfg = None if psa is None else copy.deepcopy(dict(psa))

    def _freeze_stages(self) -> None:
        """Stock stage freezing; the ``psa`` children keep their grad flags and mode."""
        saved = [(p, p.requires_grad) for m in psa_modules(self) for p in m.parameters()]
        modes = [(sub, sub.training) for m in psa_modules(self) for sub in m.modules()]
        super()._freeze_stages()
        for param, requires_grad in saved:
            param.requires_grad = requires_grad
        for sub, training in modes:
            sub.training = training

    def init_weights(self) -> None:
        """Stock init, then each ``psa``'s own init, then a ``Pretrained`` checkpoint."""
        if not psa_modules(self) or self.is_init:
            super().init_weights()
            return
        seed = int(torch.randint(2**62, (), dtype=torch.int64))
        super().init_weights()
        init_psa(self, seed)
        cfgs = self.init_cfg
        if not isinstance(cfgs, (list, tuple)):
            cfgs = [cfgs]
        pretrained = [cfg for cfg in cfgs if _is_pretrained(cfg)]
        if pretrained:
            from mmengine.model import initialize  # a PSA backbone is an mmengine BaseModule
            initialize(self, pretrained)
