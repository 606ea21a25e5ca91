"""Parameters and FLOPs of a config's model, PSA against its stock counterpart.

Counts come from mmengine's analysis (``mmengine.analysis.get_model_complexity_info``, which
traces the model with ``torch.jit`` and counts one multiply-add as one FLOP), for seg and
pose configs alike: the registry scope is the config's ``default_scope``. They differ from
the paper's (which counts conv/linear layers only), so compare PSA − stock from this one tool.

By default each PSA block is counted as it runs here (its fused evaluation, which reorders
the linear maps and needs fewer multiply-adds); ``literal=True`` counts the literal form of
the paper and the released code instead (same parameters, same outputs).

The stock counterpart of a config is the same config with every PSA part removed: each
``psa=...`` set to ``None`` (a PSA backbone or head with ``psa=None`` is the stock module, bit
for bit), every ``PSANeck`` dropped, every ``PolarizedSelfAttention`` mmcv plugin dropped. For
our full configs that is exactly the stock ``mmseg::``/``mmpose::`` base; another base can be
given explicitly.
"""
import copy
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.analysis import get_model_complexity_info
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm

from ..checkpoint import build_model_cfg
from ..layers import PolarizedSelfAttention
from .runner import load_config

ConfigLike = Union[str, Path, Config]


@dataclass
class Complexity:
    """What one analysis measured.

    Args:
        params: Number of parameters (auxiliary heads excluded, as mmseg's get_flops).
        flops: FLOPs of one forward of a single image (one multiply-add = one FLOP).
        input_shape: ``(3, H, W)`` analysed.
    """

    params: int
    flops: int
    input_shape: Tuple[int, int, int]


@dataclass
class Comparison:
    """A config's complexity beside its stock counterpart's."""

    config: str
    psa: Complexity
    stock: Complexity
    stock_from: str
    psa_form: str = 'fused'

    @property
    def extra_params(self) -> int:
        return self.psa.params - self.stock.params

    @property
    def extra_flops(self) -> int:
        return self.psa.flops - self.stock.flops

    def as_dict(self) -> Dict[str, Any]:
        """A JSON-friendly record."""
        out = asdict(self)
        out.update(extra_params=self.extra_params, extra_flops=self.extra_flops)
        return out


def default_input_hw(cfg: Config) -> Tuple[int, int]:
    """The ``(H, W)`` a config trains on.

    mmseg's ``crop_size`` is ``(H, W)``; mmpose's ``codec.input_size`` is ``(W, H)``;
    otherwise ``model.data_preprocessor.size`` (``(H, W)``).

    Args:
        cfg: The config.
    """
    if cfg.get('crop_size') is not None:
        h, w = cfg.crop_size
        return int(h), int(w)
    codecs = cfg.get('codec')
    for codec in codecs if isinstance(codecs, (list, tuple)) else [codecs]:
        if isinstance(codec, dict) and codec.get('input_size') is not None:
            w, h = codec['input_size']
            return int(h), int(w)
    size = (cfg.get('model') or {}).get('data_preprocessor', {}).get('size')
    if size is not None:
        h, w = size
        return int(h), int(w)
    raise ValueError('the config names no input size (crop_size, codec.input_size, '
                     'model.data_preprocessor.size): pass input_hw=(H, W) / --shape H W')


def _type_name(node: Any) -> Optional[str]:
    kind = node.get('type') if isinstance(node, dict) else None
    return getattr(kind, '__name__', kind)


def strip_psa(model_cfg: dict) -> dict:
    """Return a copy of a model config with every PSA part removed (see the module doc).

    Args:
        model_cfg: ``cfg.model``.
    """
    model_cfg = copy.deepcopy(model_cfg)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            neck = node.get('neck')
            if _type_name(neck) == 'PSANeck':
                node['neck'] = None
            elif isinstance(neck, (list, tuple)):
                node['neck'] = [n for n in neck if _type_name(n) != 'PSANeck'] or None
            if node.get('psa') is not None:
                node['psa'] = None
            plugins = node.get('plugins')
            if isinstance(plugins, (list, tuple)):
                node['plugins'] = [
                    p for p in plugins if _type_name(p.get('cfg') if isinstance(p, dict) else None)
                    != 'PolarizedSelfAttention'
                ] or None
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(model_cfg)
    return model_cfg


@contextmanager
def _quiet_analysis() -> Iterator[None]:
    """Silence the analysis' per-operator warnings (element-wise ops, norms, softmax and
    pooling are not counted -- as in mmseg's own get_flops); errors still show."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _TensorForward(torch.nn.Module):
    """Analyse ``model._forward(inputs)``: mmpose's ``forward`` requires ``data_samples``
    (its own get_flops tool does the same); for mmseg it is what ``mode='tensor'`` runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor):
        return self.model._forward(inputs)


def measure(cfg: Config,
            input_hw: Optional[Sequence[int]] = None,
            model_cfg: Optional[dict] = None,
            literal: bool = False) -> Complexity:
    """Build the config's model in its ``default_scope`` and analyse one forward.

    Args:
        cfg: The config (its ``default_scope`` picks mmseg's or mmpose's registry).
        input_hw: ``(H, W)``; default :func:`default_input_hw`.
        model_cfg: Analyse this model config instead of ``cfg.model``.
        literal: Count each PSA block's literal form instead of its fused evaluation.
    """
    h, w = default_input_hw(cfg) if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
    model = build_model_cfg(cfg, model_cfg)
    if getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None  # training only; mmseg's get_flops drops it too
    model = revert_sync_batchnorm(model).eval()  # SyncBN refuses CPU tensors
    if literal:
        for block in model.modules():
            if isinstance(block, PolarizedSelfAttention):
                block.fused = False
    with torch.no_grad(), _quiet_analysis():
        info = get_model_complexity_info(
            _TensorForward(model),
            inputs=(torch.rand(1, 3, h, w), ),
            show_table=False,
            show_arch=False)
    return Complexity(params=int(info['params']), flops=int(info['flops']), input_shape=(3, h, w))


def compare(config: ConfigLike,
            stock: Optional[ConfigLike] = None,
            input_hw: Optional[Sequence[int]] = None,
            cfg_options: Optional[dict] = None,
            literal: bool = False,
            _cache: Optional[dict] = None) -> Comparison:
    """Measure a config and its stock counterpart at the same input size.

    Args:
        config: The (PSA) config.
        stock: An explicit stock config; default: ``config`` with its PSA parts stripped.
        input_hw: ``(H, W)``; default the config's own (:func:`default_input_hw`).
        cfg_options: Overrides merged into both configs.
        literal: Count each PSA block's literal form (see the module doc).
    """
    cfg = load_config(config, cfg_options)
    hw = default_input_hw(cfg) if input_hw is None else tuple(input_hw)
    psa = measure(cfg, hw, literal=literal)
    if stock is None:
        stock_cfg, stock_model, stock_from = cfg, strip_psa(cfg.model), 'PSA stripped'
    else:
        stock_cfg = load_config(stock, cfg_options)
        stock_model, stock_from = stock_cfg.model, str(stock)
    key = (repr(stock_model.to_dict() if hasattr(stock_model, 'to_dict') else stock_model),
           stock_cfg.get('default_scope'), hw)
    if _cache is not None and key in _cache:
        base = _cache[key]
    else:
        base = measure(stock_cfg, hw, stock_model)
        if _cache is not None:
            _cache[key] = base
    name = (config.filename or 'config') if isinstance(config, Config) else str(config)
    return Comparison(
        config=name,
        psa=psa,
        stock=base,
        stock_from=stock_from,
        psa_form='literal' if literal else 'fused')


def compare_many(configs: Iterable[ConfigLike], **kwargs: Any) -> Iterable[Comparison]:
    """:func:`compare` each config in turn (a generator, for progress), reusing the analysis
    of a stock model that several configs share."""
    cache: dict = {}
    for config in configs:
        yield compare(config, _cache=cache, **kwargs)


def _fmt(n: int, unit: float, sign: bool = False) -> str:
    """``n / unit`` with two decimals, or three significant digits below 1."""
    value = n / unit
    spec = ('+' if sign else '') + ('.2f' if abs(value) >= 1 or value == 0 else '.3g')
    return format(value, spec)


def format_table(rows: Sequence[Comparison]) -> str:
    """A Markdown table: params (M) and GFLOPs of each config and its stock counterpart."""
    lines = [
        '| config | input | params (M) | stock params (M) | Δ params (M) | GFLOPs '
        '| stock GFLOPs | Δ GFLOPs |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        _, h, w = row.psa.input_shape
        lines.append(f'| {Path(row.config).stem} | {h}x{w} '
                     f'| {_fmt(row.psa.params, 1e6)} | {_fmt(row.stock.params, 1e6)} '
                     f'| {_fmt(row.extra_params, 1e6, sign=True)} '
                     f'| {_fmt(row.psa.flops, 1e9)} | {_fmt(row.stock.flops, 1e9)} '
                     f'| {_fmt(row.extra_flops, 1e9, sign=True)} |')
    return '\n'.join(lines)


def as_records(rows: Sequence[Comparison]) -> List[Dict[str, Any]]:
    """JSON-friendly records of ``rows``."""
    return [row.as_dict() for row in rows]
