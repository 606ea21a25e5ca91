"""Benchmark of the PSA block: fused vs literal, per path, parity and the profiler split.

Library side of ``tools/analysis_tools/benchmark_psa.py`` and of the block sections of
``tools/dev/gpu_check.sh`` (:mod:`mmpsa.analysis.gpu_check`); imports torch and mmpsa's layers
alone. Timings are medians over interleaved repetitions (fused, literal, fused, ...) after
warm-up, so slow drifts of a shared machine hit both forms alike; on a GPU each fwd+bwd is
timed with CUDA events. The network-level train step is :mod:`.benchmark_backbone`.
"""
import contextlib
import copy
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from mmpsa.layers import PolarizedSelfAttention, backend

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


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds of one fwd+bwd: CUDA events on a GPU (the device's timeline, host gaps
    included), ``perf_counter`` elsewhere."""
    x.grad = None
    block.zero_grad(set_to_none=True)
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(x.device)
        start.record()
        block(x).backward(grad)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
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
                seed: int = 0,
                device: Union[str, torch.device] = 'cpu') -> dict:
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
        device (str or torch.device): Default: ``'cpu'``.

    Returns:
        dict: times in seconds (medians), speed-up, saved bytes of each form.
    """
    c, h, w = shape
    fused, x, grad = _block_and_input(variant, mode, shape, batch, dtype, seed, device)
    literal = copy.deepcopy(fused)
    literal.fused = False
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


def _block_and_input(
        variant: str,
        mode: str,
        shape: Tuple[int, int, int],
        batch: int,
        dtype: torch.dtype,
        seed: int,
        device: Union[str, torch.device],
        channels_last: bool = False) -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A fused block, an input that requires grad and an output gradient, seeded."""
    c, h, w = shape
    torch.manual_seed(seed)
    block = PolarizedSelfAttention(c, mode=mode, variant=variant).to(device, dtype)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, h, w, dtype=dtype, device=device).to(memory_format=layout)
    grad = torch.randn(batch, c, h, w, dtype=dtype, device=device).to(memory_format=layout)
    return block, x.requires_grad_(), grad


#: What :func:`bench_paths` and :func:`parity` can run: the literal form, a fused block down
#: one fused path (:func:`mmpsa.layers.backend`), and BatchNorm2d on the same tensor (the
#: memory-bound reference; timing only).
PATHS = ('literal', 'auto', 'triton', 'cpu', 'aten', 'plain', 'bn')


def error_text(e: BaseException) -> str:
    """``'Type: first line of the message'``, for a table cell or a note."""
    return f'{type(e).__name__}: {(str(e).splitlines() or [""])[0]}'


def _on_path(path: str):
    """The fused path ``path`` for the code inside (nothing to select for literal and BN)."""
    return contextlib.nullcontext() if path in ('literal', 'bn') else backend(path)


def _path_module(path: str, block: torch.nn.Module) -> torch.nn.Module:
    if path == 'bn':
        param = next(block.parameters())
        return torch.nn.BatchNorm2d(block.in_channels).to(param.device)
    if path == 'literal':
        literal = copy.deepcopy(block)
        literal.fused = False
        return literal
    if path not in PATHS:
        raise ValueError(f'path must be one of {PATHS}, got {path!r}')
    return block


def bench_paths(variant: str,
                mode: str,
                shape: Tuple[int, int, int],
                paths: Sequence[str] = ('literal', 'aten', 'triton', 'bn'),
                batch: int = 2,
                reps: int = 20,
                dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device] = 'cpu',
                seed: int = 0) -> dict:
    """Median fwd+bwd time of the block down each of ``paths`` (:data:`PATHS`), interleaved.

    A path that cannot run here (e.g. ``triton`` without a GPU or the interpreter) gets
    its error message instead of a time.

    Args:
        variant, mode, shape, batch, dtype, seed: As for :func:`bench_shape`.
        paths (sequence of str): What to time.
        reps (int): Interleaved repetitions after 3 warm-ups. Default: 20.
        device (str or torch.device): Default: ``'cpu'``.

    Returns:
        dict: ``variant``, ``mode``, ``shape``, ``batch``, ``dtype``, ``times`` (path ->
        seconds or the error), ``taken`` (path -> what ran: the block's ``last_path``).
    """
    block, x, grad = _block_and_input(variant, mode, shape, batch, dtype, seed, device)
    modules = {p: _path_module(p, block) for p in paths}
    times: Dict[str, Union[List[float], str]] = {}
    taken: Dict[str, str] = {}
    for path in paths:
        try:
            with _on_path(path):
                for _ in range(3):
                    _step(modules[path], x, grad)
            taken[path] = getattr(modules[path], 'last_path', 'bn')
            times[path] = []
        except Exception as e:  # noqa: BLE001  (e.g. triton's compile errors: the cell says)
            times[path] = error_text(e)
    for _ in range(reps):
        for path in paths:
            if isinstance(times[path], list):
                with _on_path(path):
                    times[path].append(_step(modules[path], x, grad))
    return dict(
        variant=variant,
        mode=mode,
        shape=shape,
        batch=batch,
        dtype=str(dtype).replace('torch.', ''),
        times={
            p: statistics.median(t) if isinstance(t, list) else t
            for p, t in times.items()
        },
        taken=taken)


def format_paths_table(results: Sequence[dict]) -> str:
    """A Markdown table of :func:`bench_paths` results: ms per path, x literal, x BN."""
    paths = list(results[0]['times']) if results else []
    head = '| variant | mode | dtype | B x C @ H x W | ' + ' | '.join(f'{p} ms'
                                                                      for p in paths) + ' | ran |'
    lines = [head, '|' + '---|' * 4 + '---:|' * len(paths) + '---|']
    for r in results:
        c, h, w = r['shape']
        cells = []
        for p in paths:
            t = r['times'][p]
            if isinstance(t, str):
                cells.append('n/a')
                continue
            cell = f'{t * 1e3:.3f}'
            lit, bn = r['times'].get('literal'), r['times'].get('bn')
            if p not in ('literal', 'bn') and isinstance(lit, float):
                cell += f' (x{lit / t:.2f} lit'
                cell += f', {t / bn:.2f} BN)' if isinstance(bn, float) else ')'
            cells.append(cell)
        ran = ', '.join(f'{p}={r["taken"][p]}' for p in paths if p in r['taken'])
        lines.append(f'| {r["variant"]} | {r["mode"]} | {r["dtype"]} | {r["batch"]} x {c} @ '
                     f'{h} x {w} | ' + ' | '.join(cells) + f' | {ran} |')
    errors = {(p, t) for r in results for p, t in r['times'].items() if isinstance(t, str)}
    lines += [f'- {p} n/a: {t}' for p, t in sorted(errors)]
    return '\n'.join(lines)


#: The largest error (:func:`parity`) a fused path may have against the fp64 literal form,
#: by input dtype.
TOLERANCES: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2
}


def parity(variant: str,
           mode: str,
           shape: Tuple[int, int, int],
           paths: Sequence[str] = ('aten', 'triton'),
           batch: int = 2,
           dtype: torch.dtype = torch.float32,
           device: Union[str, torch.device] = 'cpu',
           seed: int = 0,
           channels_last: bool = False) -> Dict[str, Union[dict, str]]:
    """Error of each fused path against the literal form in fp64, and its reproducibility.

    The error is the max over the output, the input gradient and every parameter gradient
    of ``max |got - ref| / max |ref|`` (``ch_wq.bias``, whose exact gradient is 0, left
    out; compare it with :data:`TOLERANCES`). Each path runs twice on the same tensors.

    Args:
        variant, mode, shape, batch, dtype, seed: As for :func:`bench_shape`.
        paths (sequence of str): Fused paths (:data:`mmpsa.layers.BACKENDS`), or
            ``'literal'`` (the literal form in ``dtype``: how far rounding alone takes it).
        device (str or torch.device): Default: ``'cpu'``.
        channels_last (bool): Input and output gradient in ``channels_last``.

    Returns:
        dict: path -> ``dict(error, ran, bitwise)`` (``ran``: the block's ``last_path``;
        ``bitwise``: the two runs gave bitwise equal output and gradients), or the message
        of the error that stopped the path.
    """
    if 'bn' in paths:
        raise ValueError('parity compares PSA paths: bn (BatchNorm2d) has no literal form')
    block, x, grad = _block_and_input(variant, mode, shape, batch, dtype, seed, device,
                                      channels_last)
    ref = copy.deepcopy(block).double()
    ref.fused = False

    def run(module, xx, gg):
        xx = xx.detach().requires_grad_()
        module.zero_grad(set_to_none=True)
        out = module(xx)
        out.backward(gg)
        grads = [p.grad for n, p in module.named_parameters() if n != 'ch_wq.bias']
        return [out.detach(), xx.grad] + grads

    want = run(ref, x.double(), grad.double())
    results: Dict[str, Union[dict, str]] = {}
    for path in paths:
        module = _path_module(path, block)
        try:
            with _on_path(path):
                got = run(module, x, grad)
                again = run(module, x, grad)
            results[path] = dict(
                error=max(((a.double() - b).abs().max() / b.abs().max()).item()
                          for a, b in zip(got, want)),
                ran=module.last_path,
                bitwise=all(torch.equal(a, b) for a, b in zip(got, again)))
        except Exception as e:  # noqa: BLE001  (e.g. triton's compile errors: the cell says)
            results[path] = error_text(e)
    return results


def triton_kernel_names() -> Tuple[str, ...]:
    """Names of the ``@triton.jit`` kernels of :mod:`mmpsa.layers.psa_triton` (its launched
    functions, ``*_kernel``); empty when the Triton path is not available here."""
    from mmpsa.layers import dispatch
    module = dispatch.triton_module()
    if module is None:
        return ()
    return tuple(
        sorted(name for name, obj in vars(module).items()
               if name.endswith('_kernel') and hasattr(obj, 'fn') and hasattr(obj, 'run')))


def profile_split(variant: str,
                  mode: str,
                  shape: Tuple[int, int, int],
                  path: str,
                  batch: int = 2,
                  dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device] = 'cpu',
                  steps: int = 5,
                  seed: int = 0) -> dict:
    """Where one fwd+bwd of the block down ``path`` (:data:`PATHS`) spends its time.

    After 3 warm-up steps: ``step_ms`` (median of ``steps`` steps, CUDA events on a GPU),
    ``host_ms`` (median time the host takes to issue one step: no synchronisation at its
    end, so on a GPU it is the launch cost, the kernels' time where the host waits), and
    from ``torch.profiler`` over ``steps`` more steps, per step: ``triton_ms`` (the device
    time of :func:`triton_kernel_names`' kernels), ``other_ms`` (every other device kernel,
    copy and fill) and ``launches`` (device activities). The device columns are None off
    CUDA. ``ran``: the path the block took.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    block, x, grad = _block_and_input(variant, mode, shape, batch, dtype, seed, device)
    module = _path_module(path, block)
    names = triton_kernel_names()
    with _on_path(path):
        for _ in range(3):
            _step(module, x, grad)
        step = statistics.median(_step(module, x, grad) for _ in range(steps))
        host = []
        for _ in range(steps):
            x.grad = None
            module.zero_grad(set_to_none=True)
            _sync(x.device)
            t0 = time.perf_counter()
            module(x).backward(grad)
            host.append(time.perf_counter() - t0)
        _sync(x.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                x.grad = None
                module.zero_grad(set_to_none=True)
                module(x).backward(grad)
            _sync(x.device)
    triton_us = other_us = 0.0
    launches = 0
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        launches += 1
        us = event.time_range.elapsed_us()
        if any(event.name.startswith(name) for name in names):
            triton_us += us
        else:
            other_us += us
    cuda = x.is_cuda
    return dict(
        variant=variant,
        mode=mode,
        shape=shape,
        batch=batch,
        dtype=str(dtype).replace('torch.', ''),
        path=path,
        ran=getattr(module, 'last_path', 'bn'),
        step_ms=step * 1e3,
        host_ms=statistics.median(host) * 1e3,
        triton_ms=triton_us / steps / 1e3 if cuda else None,
        other_ms=other_us / steps / 1e3 if cuda else None,
        launches=launches / steps if cuda else None)


def format_profile_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`profile_split` rows (``n/a``: not on CUDA)."""

    def ms(v: Optional[float]) -> str:
        return 'n/a' if v is None else f'{v:.3f}'

    lines = [
        '| variant | mode | dtype | B x C @ H x W | path | ran | step ms | host ms (issue) '
        '| Triton kernels ms | other kernels ms | launches |',
        '|---|---|---|---|---|---|---:|---:|---:|---:|---:|'
    ]
    for r in rows:
        c, h, w = r['shape']
        launches = 'n/a' if r['launches'] is None else f'{r["launches"]:.0f}'
        lines.append(f'| {r["variant"]} | {r["mode"]} | {r["dtype"]} | {r["batch"]} x {c} @ {h} '
                     f'x {w} | {r["path"]} | {r["ran"]} | {ms(r["step_ms"])} | '
                     f'{ms(r["host_ms"])} | {ms(r["triton_ms"])} | {ms(r["other_ms"])} | '
                     f'{launches} |')
    return '\n'.join(lines)


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run_benchmark(configs: Sequence[Tuple[str, str]] = CONFIGS,
                  shapes: Sequence[Tuple[int, int, int]] = HRNET_SHAPES + SEG_SHAPES,
                  batch: int = 2,
                  reps: int = 0,
                  min_time: float = 1.0,
                  threads: Optional[int] = 2,
                  log: Optional[Callable[[str], None]] = print,
                  dtype: torch.dtype = torch.float32,
                  device: Union[str, torch.device] = 'cpu') -> List[dict]:
    """Run :func:`bench_shape` over ``configs`` x ``shapes``.

    Args:
        configs: ``(variant, mode)`` pairs.
        shapes: ``(C, H, W)`` triples.
        batch, reps, min_time: See :func:`bench_shape`.
        threads (int, optional): ``torch.set_num_threads``; None leaves it.
        log (callable, optional): Progress output (one line per shape).
        dtype, device: Of the blocks and inputs. Default: float32, ``'cpu'``.

    Returns:
        list[dict]: One result per (config, shape).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    results = []
    for variant, mode in configs:
        for shape in shapes:
            r = bench_shape(variant, mode, shape, batch, reps, min_time, dtype=dtype, device=device)
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
