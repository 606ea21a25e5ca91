"""Config -> scope -> model: the one builder of models that a checkpoint is loaded into.

Export, attention maps, complexity and the released-weights converter build their models
here; the weights come through the door (:func:`load_into_model`), with the purpose deciding
what is an error (:func:`mmpsa.checkpoint.check_psa_match`).
"""
import contextlib
import copy
from pathlib import Path
from typing import Any, Optional, Union

import torch
from mmengine.config import Config

from ..necks import check_feature_channels
from ..utils.paths import PACKAGE_PREFIX, config_path
from .door import read_checkpoint
from .match import check_psa_match, keep_missing_psa

#: The ``default_scope`` values whose models mmpsa builds.
SCOPES = ('mmseg', 'mmpose')
ConfigLike = Union[str, Path, Config]


def load_config(config: ConfigLike, cfg_options: Optional[dict] = None) -> Config:
    """Load a config and merge ``--cfg-options`` into it.

    Args:
        config: A path, a package config (``'mmseg::hrnet/fcn_hr48_...py'``,
            ``'mmpsa::mmseg/tiny/...py'``), or a ``Config`` (copied).
        cfg_options: ``key=value`` overrides (mmengine's ``DictAction`` result).

    Returns:
        The config; its ``default_scope`` is one of :data:`SCOPES`.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif str(config).startswith(PACKAGE_PREFIX):
        cfg = Config.fromfile(str(config_path(config)))
    elif '::' in str(config):
        from mmengine.hub import get_config  # package configs: mmseg::..., mmpose::...
        cfg = get_config(str(config))
    else:
        cfg = Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ValueError(f'{config}: default_scope must be one of {SCOPES}, got {scope!r}')
    return cfg


def scope_of(config: ConfigLike) -> str:
    """The config's ``default_scope`` (``'mmseg'`` or ``'mmpose'``)."""
    cfg = config if isinstance(config, Config) else Config.fromfile(str(config))
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ValueError(f'config default_scope must be one of {SCOPES}, got {scope!r}')
    return scope


def build_model_cfg(cfg: Config, model_cfg: Optional[dict] = None, device: Any = None):
    """``MODELS.build`` of ``cfg.model`` (or ``model_cfg``) in the config's scope, no weights
    loaded and no ``init_weights`` (so no ``pretrained`` download); ``device='meta'`` gives
    keys and shapes without memory. The PSA necks' and heads' channels are checked
    (:func:`~mmpsa.necks.check_feature_channels`)."""
    from mmengine.registry import MODELS, DefaultScope
    model_cfg = copy.deepcopy(cfg.model if model_cfg is None else model_cfg)
    with DefaultScope.overwrite_default_scope(scope_of(cfg)):
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = MODELS.build(model_cfg)
    check_feature_channels(model)
    return model


def load_into_model(model: torch.nn.Module,
                    filename: str,
                    purpose: str,
                    allow_missing_psa: bool = False,
                    strict: bool = False) -> dict:
    """Read a checkpoint through the door, check it against ``model`` for ``purpose``
    (:func:`~mmpsa.checkpoint.check_psa_match`) and load its weights.

    Returns:
        The checkpoint.
    """
    from mmengine.runner.checkpoint import _load_checkpoint_to_model
    checkpoint = read_checkpoint(filename, map_location='cpu')
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {filename!r} holds a {type(checkpoint).__name__}, not a '
                         'dict with a state_dict')
    accepted = check_psa_match(checkpoint, model, str(filename), purpose, allow_missing_psa)
    keep_missing_psa(checkpoint, model, accepted)
    return _load_checkpoint_to_model(model, checkpoint, strict)


def build_model(config: ConfigLike,
                checkpoint: Optional[str] = None,
                purpose: str = 'test',
                cfg_options: Optional[dict] = None,
                device: str = 'cpu',
                allow_missing_psa: bool = False) -> torch.nn.Module:
    """Build an mmseg/mmpose config's model for inference, its weights through the door.

    The model is what the library's own ``init_model`` builds (eval mode, ``model.cfg``,
    ``dataset_meta``, mmpose's BN reverted), but the checkpoint is read by
    :func:`~mmpsa.checkpoint.read_checkpoint` and checked for ``purpose``.

    Args:
        config: Config path, package config or ``Config``.
        checkpoint: Local path or URL (``None``: the model's construction-time init).
        purpose: ``'test'``, ``'export'`` or ``'attention'``.
        cfg_options: Config overrides.
        device: Torch device.
        allow_missing_psa: A stock checkpoint for a PSA config is meant.
    """
    cfg = load_config(config, cfg_options)
    scope = scope_of(cfg)
    if scope == 'mmseg':
        from mmseg.apis import init_model
    else:
        from mmpose.apis import init_model
    model = init_model(cfg, None, device='cpu')
    check_feature_channels(model)
    if checkpoint is not None:
        ckpt = load_into_model(model, checkpoint, purpose, allow_missing_psa=allow_missing_psa)
        meta = ckpt.get('meta') or {}
        if 'dataset_meta' in meta:
            model.dataset_meta = meta['dataset_meta']
        elif scope == 'mmseg' and getattr(model, 'dataset_meta', None) is None:
            from mmseg.utils import get_classes, get_palette
            model.dataset_meta = dict(
                classes=get_classes('cityscapes'), palette=get_palette('cityscapes'))
    return model.to(device).eval()
