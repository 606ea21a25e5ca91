"""Network-level cost of PSA: one train step of a PSA backbone vs the stock one.

Library side of ``tools/benchmark_backbone.py``. Two networks of the paper:

* ``hrnet-w48``: mmpose's HRNet-W48 (the top-down 256x192 pose backbone), input
  ``(B, 3, 256, 192)``;
* ``r50-d8``: mmseg's ResNetV1c-50 D8 (the DeepLabV3+ R50-D8 backbone: dilations
  (1, 1, 2, 4), strides (1, 2, 1, 1), contract_dilation), input ``(B, 3, 256, 512)``.

A train step is forward, a scalar loss over every output, backward and an SGD step, in
train mode. The stock backbone and the PSA backbone(s) (paper variant, parallel, every
residual block; fused and/or literal block) are built from the registries, start from
the same weights, and are timed interleaved (stock, PSA, stock, PSA, ...) after a
warm-up, so drifts of a shared machine hit every model alike; medians are reported.
"""
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

HRNET_W48_EXTRA = dict(
    stage1=dict(
        num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(4, ), num_channels=(64, )),
    stage2=dict(
        num_modules=1, num_branches=2, block='BASIC', num_blocks=(4, 4), num_channels=(48, 96)),
    stage3=dict(
        num_modules=4,
        num_branches=3,
        block='BASIC',
        num_blocks=(4, 4, 4),
        num_channels=(48, 96, 192)),
    stage4=dict(
        num_modules=3,
        num_branches=4,
        block='BASIC',
        num_blocks=(4, 4, 4, 4),
        num_channels=(48, 96, 192, 384)))

R50_D8 = dict(
    depth=50,
    num_stages=4,
    out_indices=(0, 1, 2, 3),
    dilations=(1, 1, 2, 4),
    strides=(1, 2, 1, 1),
    norm_cfg=dict(type='BN', requires_grad=True),
    norm_eval=False,
    style='pytorch',
    contract_dilation=True)


def _hrnet_w48(psa: Optional[dict]) -> nn.Module:
    from mmpose.registry import MODELS

    import mmpsa.pose  # noqa: F401  (registers PSAHRNet)
    if psa is None:
        return MODELS.build(dict(type='HRNet', extra=HRNET_W48_EXTRA))
    return MODELS.build(dict(type='PSAHRNet', extra=HRNET_W48_EXTRA, psa=psa))


def _r50_d8(psa: Optional[dict]) -> nn.Module:
    from mmseg.registry import MODELS

    import mmpsa.seg  # noqa: F401  (registers PSAResNetV1c)
    if psa is None:
        return MODELS.build(dict(type='ResNetV1c', **R50_D8))
    return MODELS.build(dict(type='PSAResNetV1c', psa=psa, **R50_D8))


Builder = Callable[[Optional[dict]], nn.Module]

#: name -> (title, builder(psa), input (C, H, W)).
NETWORKS: Dict[str, Tuple[str, Builder, Tuple[int, int, int]]] = {
    'hrnet-w48': ('HRNet-W48 (mmpose)', _hrnet_w48, (3, 256, 192)),
    'r50-d8': ('ResNetV1c-50-D8 (mmseg)', _r50_d8, (3, 256, 512)),
}
BLOCKS = ('fused', 'literal')


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _train_step(model: nn.Module, optim: torch.optim.Optimizer,
                x: torch.Tensor) -> Tuple[float, float]:
    """One forward + backward + SGD step; returns its (wall, process CPU) seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    outs = model(x)
    loss = sum(out.float().square().mean() for out in outs)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def benchmark_network(name: str,
                      blocks: Sequence[str] = BLOCKS,
                      batch: int = 2,
                      reps: int = 5,
                      warmup: int = 1,
                      seed: int = 0,
                      log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Time one train step of the stock backbone and its PSA versions, interleaved.

    Both the wall time and the process CPU time of each step are recorded: on a machine
    shared with other jobs, the CPU time of a single-threaded run (``threads=1``) is the
    steadier measure of the work; the wall time is what a user waits.

    Args:
        name: A key of :data:`NETWORKS`.
        blocks: PSA block forms to time: ``'fused'`` and/or ``'literal'``.
        batch: Batch size.
        reps: Timed steps per model.
        warmup: Untimed steps per model first.
        seed: Seed for the weights and the input.
        log: Called with a progress line after each round (e.g. ``print``).

    Returns:
        One row per model (``'stock'`` first): network, input, block, params, median
        wall and CPU seconds per step, and their overheads vs stock in percent.
    """
    if name not in NETWORKS:
        raise ValueError(f'name must be one of {sorted(NETWORKS)}, got {name!r}')
    for block in blocks:
        if block not in BLOCKS:
            raise ValueError(f'blocks entries must be in {BLOCKS}, got {block!r}')
    if reps < 1:
        raise ValueError(f'reps must be >= 1, got {reps!r}')
    title, build, (c, h, w) = NETWORKS[name]
    torch.manual_seed(seed)
    models = {'stock': build(None)}
    for block in blocks:
        torch.manual_seed(seed)
        model = build(dict(mode='parallel', variant='paper', fused=block == 'fused'))
        # the stock weights, so both run on the same numbers; the PSAs keep their init
        model.load_state_dict(models['stock'].state_dict(), strict=False)
        models[block] = model
    optims = {}
    for key, model in models.items():
        model.train()
        optims[key] = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))
    times: Dict[str, List[Tuple[float, float]]] = {key: [] for key in models}
    for i in range(warmup + reps):
        last = {key: _train_step(model, optims[key], x) for key, model in models.items()}
        if i >= warmup:
            for key, seconds in last.items():
                times[key].append(seconds)
        if log is not None:
            stage = 'warm-up' if i < warmup else f'rep {i - warmup + 1}/{reps}'
            log(f'{name} {stage}: ' + ', '.join(f'{k} {t[0]:.2f} s (cpu {t[1]:.2f} s)'
                                                for k, t in last.items()))
    medians = {key: tuple(statistics.median(col) for col in zip(*ts)) for key, ts in times.items()}
    base_wall, base_cpu = medians['stock']
    rows = []
    for key, model in models.items():
        wall, cpu = medians[key]
        stock = key == 'stock'
        rows.append(
            dict(
                network=title,
                input=f'{batch}x{c}x{h}x{w}',
                block=key,
                params=count_params(model),
                wall_s=wall,
                cpu_s=cpu,
                wall_overhead_pct=None if stock else 100 * (wall / base_wall - 1),
                cpu_overhead_pct=None if stock else 100 * (cpu / base_cpu - 1)))
    return rows


def _pct(value: Optional[float]) -> str:
    return '—' if value is None else f'{value:+.1f} %'


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`benchmark_network` rows."""
    lines = [
        '| network | input | PSA block | params (M) | step wall (s) | overhead wall '
        '| step CPU (s) | overhead CPU |', '|---|---|---|---:|---:|---:|---:|---:|'
    ]
    for row in rows:
        lines.append(f"| {row['network']} | {row['input']} | {row['block']} | "
                     f"{row['params'] / 1e6:.2f} | {row['wall_s']:.3f} | "
                     f"{_pct(row['wall_overhead_pct'])} | {row['cpu_s']:.3f} | "
                     f"{_pct(row['cpu_overhead_pct'])} |")
    return '\n'.join(lines)


def run(networks: Sequence[str] = tuple(NETWORKS),
        blocks: Sequence[str] = BLOCKS,
        batch: int = 2,
        reps: int = 5,
        warmup: int = 1,
        threads: Optional[int] = None,
        seed: int = 0,
        quiet: bool = False) -> str:
    """Benchmark each network and return the Markdown table (CPU, fp32).

    Args:
        networks: Keys of :data:`NETWORKS`.
        blocks: PSA block forms: ``'fused'`` and/or ``'literal'``.
        batch: Batch size.
        reps: Timed steps per model.
        warmup: Untimed steps per model first.
        threads: ``torch.set_num_threads`` (None: torch's default).
        seed: Seed for weights and inputs.
        quiet: No progress lines on stderr.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f'threads must be >= 1, got {threads!r}')
        torch.set_num_threads(threads)
    log = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = []
    for name in networks:
        rows.extend(
            benchmark_network(
                name, blocks, batch=batch, reps=reps, warmup=warmup, seed=seed, log=log))
    header = (f'CPU fp32, {torch.get_num_threads()} thread(s), torch {torch.__version__}; '
              f'one train step (fwd + bwd + SGD), medians of {reps} interleaved reps '
              f'after {warmup} warm-up; PSA: paper variant, parallel, every residual '
              f'block. CPU = process CPU time (with 1 thread: the work, steady on a '
              f'shared machine).')
    return header + '\n\n' + format_table(rows)
