"""Export a seg or pose model (or any image module) to ONNX and check it with onnxruntime.

The export goes through ``torch.export`` (non-strict) under :func:`export_rewrites`, then
``torch.onnx.export(..., dynamo=True)``; the file is then run with onnxruntime on the CPU
and compared with the eager model at the exported size and, for a dynamic export, at two
more sizes, all multiples of a size divisor (32 for mmseg's/mmpose's HRNet and ResNet); a size
over the tolerance refuses the export and removes the file. A model whose code fixes a size
at export (an ``int()`` of a traced size) is off at another size; the modules that turn
symbolic sizes into constants are then named. A multi-scale (mscale) segmentor whose test
combines scales is refused (its exportable forward is the single-scale one). Needs the
``deploy`` extra (``pip install mmpsa[deploy]``: onnx, onnxscript, onnxruntime) and torch >= 2.5
(``torch.export.Dim.AUTO``, ``torch.onnx.export(dynamo=True)``; :mod:`mmpsa.compat`): an older
torch is refused with :class:`~mmpsa.compat.UnsupportedVersionError` before anything is built.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .. import compat
from .rewriters import export_rewrites

#: Largest ``max |onnx - eager| / max |eager|`` a check accepts.
TOLERANCE = 1e-4
#: Ops whose output size is fixed by design, not baked in by the export.
_FIXED_SIZE_OPS = ('adaptive_avg_pool', 'adaptive_max_pool')


class DeployError(RuntimeError):
    """A model that cannot be exported as asked; the message says why."""


class TensorForward(nn.Module):
    """``model(inputs, mode='tensor')`` as a module of one tensor: a segmentor's logits,
    a top-down pose model's heatmaps. The input is the preprocessed (normalised) batch.

    Args:
        model: An mmseg segmentor or mmpose pose estimator.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs, None, mode='tensor')
        if not isinstance(out, torch.Tensor):
            raise DeployError(f"{type(self.model).__name__}(mode='tensor') returns "
                              f'{type(out).__name__}, not one tensor: not exportable here')
        return out


@dataclass
class Comparison:
    """onnxruntime against eager at one input size."""
    shape: Tuple[int, int]
    max_abs: float
    max_rel: float  # max_abs / max |eager|
    note: str = ''

    @property
    def ok(self) -> bool:
        return self.max_rel <= TOLERANCE

    def __str__(self) -> str:
        h, w = self.shape
        text = f'{h}x{w}: max abs diff {self.max_abs:.2e}, relative {self.max_rel:.2e}'
        return f'{text} ({self.note})' if self.note else text


@dataclass
class ExportReport:
    """What :func:`export_module` wrote and measured."""
    path: Path
    dynamic: bool
    seconds: float = 0.0
    rewrites: List[str] = field(default_factory=list)
    checks: List[Comparison] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def compare(actual: np.ndarray, expected: torch.Tensor, shape: Tuple[int, int]) -> Comparison:
    """The max abs and relative difference of ``actual`` to ``expected`` (inf if the
    shapes differ)."""
    ref = expected.detach().numpy()
    if actual.shape != ref.shape:
        return Comparison(shape, float('inf'), float('inf'),
                          f'output shape {tuple(actual.shape)}, eager {tuple(ref.shape)}')
    diff = float(np.abs(actual - ref).max())
    scale = max(float(np.abs(ref).max()), 1e-12)
    return Comparison(shape, diff, diff / scale)


def baked_in_sizes(program: torch.export.ExportedProgram) -> List[str]:
    """The modules of ``program`` that turn symbolic image sizes into constants.

    A node counts when it maps a (N, C, H, W) tensor with a symbolic H or W to one whose
    H and W are constants larger than 1 (adaptive pooling excepted), e.g. an upsample
    to ``int(h * 2)`` computed at export.

    Returns:
        ``'path (Class)'`` of each such module, in graph order, once.
    """

    def symbolic(value) -> bool:
        return (isinstance(value, torch.Tensor) and value.dim() == 4
                and any(isinstance(d, torch.SymInt) for d in value.shape[2:]))

    found: List[str] = []
    for node in program.graph.nodes:
        out = node.meta.get('val')
        if (node.op != 'call_function' or not isinstance(out, torch.Tensor) or out.dim() != 4
                or symbolic(out) or max(out.shape[2:]) <= 1
                or any(op in str(node.target) for op in _FIXED_SIZE_OPS)
                or not any(symbolic(arg.meta.get('val')) for arg in node.all_input_nodes)):
            continue
        stack = list((node.meta.get('nn_module_stack') or {}).values())
        path, cls = stack[-1] if stack else ('', '')
        path = path.split('.', 1)[1] if path.startswith('model.') else path
        name = getattr(cls, '__name__', str(cls).rsplit('.', 1)[-1])
        entry = f'{path or "<top>"} ({name})'
        if entry not in found:
            found.append(entry)
    return found


def run_onnx(path: Union[str, Path], inputs: torch.Tensor) -> np.ndarray:
    """Run an exported file with onnxruntime on the CPU."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])
    return sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})[0]


def _eager(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(inputs)


def default_size_divisor(module: nn.Module) -> int:
    """The side multiple the model needs: its data preprocessor's ``size_divisor`` if set
    (mmseg pads inputs to it), else 32 (the output stride of mmseg's and mmpose's HRNet and
    ResNet models, whose upsampling is exact only at multiples of it)."""
    model = getattr(module, 'model', module)
    divisor = getattr(getattr(model, 'data_preprocessor', None), 'size_divisor', None)
    return int(divisor) if divisor else 32


def checked_sizes(h: int,
                  w: int,
                  d: int,
                  second: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """The sizes a dynamic export is checked at: the exported one, a second (default one
    multiple of ``d`` larger on both sides) and a third of another aspect."""
    h2, w2 = (int(s) for s in second) if second else (h + d, w + d)
    return [(h, w), (h2, w2), (h2 + d, w2)]


def export_module(module: nn.Module,
                  shape: Sequence[int],
                  out: Union[str, Path],
                  dynamic: bool = False,
                  opset: Optional[int] = None,
                  second_shape: Optional[Sequence[int]] = None,
                  channels: int = 3,
                  size_divisor: Optional[int] = None,
                  log: Callable[[str], None] = print) -> ExportReport:
    """Export ``module`` (one image batch in, one tensor out) to ONNX and check it.

    A dynamic export is checked at three sizes (:func:`checked_sizes`), all multiples of
    ``size_divisor``; any of them over :data:`TOLERANCE` refuses the export and removes the
    file: the file would be exact at the sizes that were checked only.

    Args:
        module: The module, in eval mode, on the CPU.
        shape: ``(H, W)`` of the example input (batch 1).
        out: The ``.onnx`` file to write.
        dynamic: Export with symbolic H and W, and check two more sizes.
        opset: The ONNX opset (default: torch's).
        second_shape: The second size (default: ``H + d, W + d``).
        channels: Input channels.
        size_divisor: ``d``, the multiple every checked side must be (default:
            :func:`default_size_divisor`).
        log: Where progress lines go.

    Returns:
        The report (checks at each size).

    Raises:
        DeployError: The export failed, or onnxruntime disagrees with eager at a checked
            size; the file is then removed.
        ValueError: ``dynamic`` with a size that is not a multiple of ``size_divisor``.
        UnsupportedVersionError: torch < 2.5 (:func:`mmpsa.compat.require_dynamo_onnx_export`).
    """
    compat.require_dynamo_onnx_export()
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise ValueError(f'shape must be two positive sides, got {tuple(shape)!r}')
    d = int(size_divisor) if size_divisor else default_size_divisor(module)
    sizes = checked_sizes(h, w, d, second_shape) if dynamic else [(h, w)]
    off = [f'{a}x{b}' for a, b in sizes if a % d or b % d]
    if dynamic and off:
        raise ValueError(f'--dynamic checks sizes that are multiples of --size-divisor {d} '
                         f'(what this model needs); {", ".join(off)} is not: choose sides '
                         f'that are multiples of {d}')
    out = Path(out)
    report = ExportReport(out, dynamic)
    start = time.time()
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(1, channels, h, w, generator=gen)
    dims = ({2: compat.dim_auto(), 3: compat.dim_auto()}, ) if dynamic else None
    log(f'[export] torch.export at {h}x{w}{" (dynamic H, W)" if dynamic else ""} ...')
    with export_rewrites() as report.rewrites:
        try:
            program = torch.export.export(module, (example, ), dynamic_shapes=dims, strict=False)
        except DeployError:
            raise
        except Exception as e:
            raise DeployError(f'torch.export failed: {type(e).__name__}: {e}') from e
    log(f'[export] {time.time() - start:.1f} s; converting to ONNX ...')
    try:
        onnx_program = torch.onnx.export(
            program, (example, ),
            dynamo=True,
            opset_version=opset,
            input_names=['inputs'],
            output_names=['outputs'],
            verbose=False)
    except Exception as e:
        raise DeployError(f'ONNX conversion failed: {type(e).__name__}: {e}') from e
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(out))
    report.seconds = time.time() - start
    log(f'[export] wrote {out} ({report.seconds:.1f} s); checking with onnxruntime at '
        f'{", ".join(f"{a}x{b}" for a, b in sizes)} (multiples of --size-divisor {d}) ...')
    rule = (f'the file is exact only where checked; dynamic exports are checked at sides '
            f'that are multiples of --size-divisor {d}')

    def check(x: torch.Tensor, expected: Optional[torch.Tensor] = None) -> Comparison:
        size = tuple(x.shape[2:])
        if expected is None:
            expected = _eager(module, x)
        try:
            result = compare(run_onnx(out, x), expected, size)
        except Exception as e:  # onnxruntime refuses (a size baked in breaks a broadcast)
            text = ' '.join(str(e).split())
            text = text if len(text) <= 600 else text[:600] + ' ...'
            result = Comparison(size, float('inf'), float('inf'),
                                f'onnxruntime failed: {type(e).__name__}: {text}')
        report.checks.append(result)
        log(f'[check] {result}')
        return result

    def refuse(message: str) -> None:
        out.unlink(missing_ok=True)
        raise DeployError(f'{message} ({out} removed)')

    first = check(example)
    if not first.ok:
        refuse(f'onnxruntime disagrees with eager at the exported size: {first}, over the '
               f'tolerance {TOLERANCE:g}')
    if not dynamic:
        return report
    placeholder = [n for n in program.graph.nodes if n.op == 'placeholder'][-1].meta['val']
    fixed = [side for side, dim in zip('HW', placeholder.shape[2:]) if isinstance(dim, int)]
    if fixed:
        refuse(f'--dynamic: the export fixed {" and ".join(fixed)} of the input '
               f'({tuple(placeholder.shape)}): the model is exact at {h}x{w} only; '
               'export without --dynamic')
    for h2, w2 in sizes[1:]:
        x2 = torch.randn(1, channels, h2, w2, generator=gen)
        try:
            expected = _eager(module, x2)
        except Exception as e:
            refuse(f'--dynamic: the model itself does not run at {h2}x{w2} ({type(e).__name__}: '
                   f'{e}); {rule}: give the --size-divisor this model needs')
        result = check(x2, expected)
        if not result.ok:
            baked = baked_in_sizes(program)
            more = f' and {len(baked) - 4} more' if len(baked) > 4 else ''
            where = ('sizes baked in as constants by: ' + ', '.join(baked[:4]) +
                     more) if baked else ('no module with a constant size found')
            refuse(f'--dynamic refused: at {result}, over the tolerance {TOLERANCE:g}; {where}. '
                   f'{rule[0].upper() + rule[1:]}: export without --dynamic, '
                   'or make those sizes symbolic (see mmpsa/deploy/rewriters.py)')
    report.notes.append(f'exact at {", ".join(f"{a}x{b}" for a, b in sizes)} (multiples of '
                        f'--size-divisor {d})')
    return report


def refuse_mscale(model: nn.Module, config: str) -> None:
    """Refuse a hierarchical multi-scale segmentor whose test combines several scales.

    Its ``forward(mode='tensor')`` is the single-scale forward (1/4 resolution, no
    ``scale_attn``), not what ``tools/test.py`` scores.
    """
    scales = list((getattr(model, 'test_cfg', None) or {}).get('scales', [1.0]))
    if type(model).__name__ == 'MscaleCascadeEncoderDecoder' and scales != [1.0]:
        raise DeployError(
            f'{config} builds a MscaleCascadeEncoderDecoder whose test combines the scales '
            f'{scales} with its scale attention; the exportable forward (mode=\'tensor\') is '
            'the single-scale forward at 1/4 resolution without scale_attn, so the file would '
            'not compute what tools/test.py scores. Export refused; to export the single-scale '
            "model on purpose, pass --cfg-options model.test_cfg.scales='[1.0]'.")


def load_model(config: Union[str, Path],
               checkpoint: Optional[str] = None,
               cfg_options: Optional[dict] = None,
               allow_missing_psa: bool = False) -> TensorForward:
    """Build a seg or pose model from its config for export: eval, CPU, plain BN.

    Args:
        config: An mmseg or mmpose config (``default_scope`` says which).
        checkpoint: Weights (default: the model's construction-time init), read through
            the checkpoint door for ``'export'`` (:func:`mmpsa.checkpoint.build_model`).
        cfg_options: Config overrides.
        allow_missing_psa: A stock checkpoint for a PSA config is meant.
    """
    from mmengine.model import revert_sync_batchnorm

    import mmpsa  # noqa: F401  (registers the PSA models)
    from mmpsa.checkpoint import build_model
    if not Path(config).is_file():
        raise ValueError(f'config not found: {str(config)!r}')
    model = build_model(
        str(config),
        checkpoint,
        purpose='export',
        cfg_options=cfg_options,
        allow_missing_psa=allow_missing_psa)
    refuse_mscale(model, str(config))
    return TensorForward(revert_sync_batchnorm(model)).eval()


def export_config(config: Union[str, Path],
                  out: Union[str, Path],
                  shape: Sequence[int],
                  checkpoint: Optional[str] = None,
                  log: Callable[[str], None] = print,
                  cfg_options: Optional[dict] = None,
                  allow_missing_psa: bool = False,
                  **kwargs) -> ExportReport:
    """Export the model of an mmseg/mmpose config (seg: logits, pose: heatmaps) to ONNX.

    Args:
        config: The config file.
        out: The ``.onnx`` file.
        shape: ``(H, W)`` of the exported input.
        checkpoint: Weights to load.
        log: Where progress lines go.
        cfg_options: Config overrides.
        allow_missing_psa: A stock checkpoint for a PSA config is meant.
        **kwargs: :func:`export_module`'s ``dynamic``, ``opset``, ``second_shape``,
            ``size_divisor``.
    """
    compat.require_dynamo_onnx_export()  # before the model is built
    log(f'[export] building {config} ...')
    model = load_model(config, checkpoint, cfg_options, allow_missing_psa)
    return export_module(model, shape, out, log=log, **kwargs)
