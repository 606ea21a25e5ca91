"""Benchmark of the PSA block: fused vs literal, fwd+bwd time and saved activations.

Library side of ``tools/benchmark_psa.py``. Timings are medians over interleaved
repetitions (fused, literal, fused, ...) after warm-up, so slow drifts of a shared
machine hit both forms alike.
"""
import copy
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mmpsa.layers import PolarizedSelfAttention

#: (C, H, W) per shape; batch 2. HRNet-like shapes first, then segmentation heads.
HRNET_SHAPES: Tuple[Tuple[int, int, int],
                    ...] = ((32, 64, 48), (64, 32, 24), (128, 16, 12), (256, 8, 6))
SEG_SHAPES: Tuple[Tuple[int, int, int], ...] = ((64, 128, 256), (512, 64, 128))
#: (variant, mode) pairs.
CONFIGS: Tuple[Tuple[str, str], ...] = (('paper', 'parallel'), ('paper', 'sequential'),
                                        ('official', 'parallel'), ('official', 'sequential'))


def saved_activation_bytes(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in ``block(x)``.

    Tensors sharing a storage are counted once; the block's parameters are not
    counted, the input is (both forms keep it).
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    del out
    return sum(storages.values())


def _step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x.grad = None
    block.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    block(x).backward(grad)
    return time.perf_counter() - t0


def bench_shape(variant: str,
                mode: str,
                shape: Tuple[int, int, int],
                batch: int = 2,
                reps: int = 0,
                min_time: float = 1.0,
                dtype: torch.dtype = torch.float32,
                seed: int = 0) -> dict:
    """Time fused vs literal fwd+bwd for one shape; measure saved activations.

    Args:
        variant (str): ``'paper'`` or ``'official'``.
        mode (str): ``'parallel'`` or ``'sequential'``.
        shape (tuple): ``(C, H, W)``.
        batch (int): Batch size. Default: 2.
        reps (int): Interleaved repetitions; 0 picks enough for about
            ``min_time`` seconds of literal steps (at least 5). Default: 0.
        min_time (float): See ``reps``. Default: 1.0.
        dtype (torch.dtype): Default: float32.
        seed (int): Default: 0.

    Returns:
        dict: times in seconds (medians), speed-up, saved bytes of each form.
    """
    c, h, w = shape
    torch.manual_seed(seed)
    fused = PolarizedSelfAttention(c, mode=mode, variant=variant).to(dtype)
    literal = copy.deepcopy(fused)
    literal.fused = False
    x = torch.randn(batch, c, h, w, dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, c, h, w, dtype=dtype)
    for _ in range(3):  # warm-up
        _step(fused, x, grad)
        t_lit = _step(literal, x, grad)
    if reps <= 0:
        reps = max(5, min(200, math.ceil(min_time / max(t_lit, 1e-6))))
    tf: List[float] = []
    tl: List[float] = []
    for _ in range(reps):
        tf.append(_step(fused, x, grad))
        tl.append(_step(literal, x, grad))
    t_f, t_l = statistics.median(tf), statistics.median(tl)
    return dict(
        variant=variant,
        mode=mode,
        shape=shape,
        batch=batch,
        reps=reps,
        fused_s=t_f,
        literal_s=t_l,
        speedup=t_l / t_f,
        fused_saved=saved_activation_bytes(fused, x),
        literal_saved=saved_activation_bytes(literal, x))


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run_benchmark(configs: Sequence[Tuple[str, str]] = CONFIGS,
                  shapes: Sequence[Tuple[int, int, int]] = HRNET_SHAPES + SEG_SHAPES,
                  batch: int = 2,
                  reps: int = 0,
                  min_time: float = 1.0,
                  threads: Optional[int] = 2,
                  log: Optional[Callable[[str], None]] = print) -> List[dict]:
    """Run :func:`bench_shape` over ``configs`` x ``shapes``.

    Args:
        configs: ``(variant, mode)`` pairs.
        shapes: ``(C, H, W)`` triples.
        batch, reps, min_time: See :func:`bench_shape`.
        threads (int, optional): ``torch.set_num_threads``; None leaves it.
        log (callable, optional): Progress output (one line per shape).

    Returns:
        list[dict]: One result per (config, shape).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    results = []
    for variant, mode in configs:
        for shape in shapes:
            r = bench_shape(variant, mode, shape, batch, reps, min_time)
            results.append(r)
            if log is not None:
                log(f'{variant:8s} {mode:10s} C={shape[0]}@{shape[1]}x'
                    f'{shape[2]}: literal {r["literal_s"] * 1e3:.2f} ms, fused '
                    f'{r["fused_s"] * 1e3:.2f} ms, x{r["speedup"]:.2f}')
    return results


def format_table(results: Sequence[dict],
                 hrnet_shapes: Sequence[Tuple[int, int, int]] = HRNET_SHAPES) -> str:
    """A Markdown table of ``results`` plus the geometric-mean speed-ups."""
    mib = 1024.0**2
    lines = [
        '| variant | mode | B x C @ H x W | literal ms | fused ms | speed-up '
        '| saved literal MiB | saved fused MiB |', '|---|---|---|---:|---:|---:|---:|---:|'
    ]
    for r in results:
        c, h, w = r['shape']
        lines.append(f'| {r["variant"]} | {r["mode"]} | {r["batch"]} x {c} @ {h} x {w} '
                     f'| {r["literal_s"] * 1e3:.2f} | {r["fused_s"] * 1e3:.2f} '
                     f'| x{r["speedup"]:.2f} | {r["literal_saved"] / mib:.2f} '
                     f'| {r["fused_saved"] / mib:.2f} |')
    lines.append('')
    hr = {tuple(s) for s in hrnet_shapes}
    seen = []
    for r in results:
        key = (r['variant'], r['mode'])
        if key in seen:
            continue
        seen.append(key)
        sp = [
            q['speedup'] for q in results
            if (q['variant'], q['mode']) == key and tuple(q['shape']) in hr
        ]
        if sp:
            lines.append(f'- {key[0]} {key[1]}: geometric-mean speed-up over '
                         f'the HRNet shapes x{geomean(sp):.2f}')
    return '\n'.join(lines)
