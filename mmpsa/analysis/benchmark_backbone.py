"""Network-level cost of PSA: one train step of a PSA backbone vs the stock one.

Library side of ``tools/analysis_tools/benchmark_backbone.py`` and the one train-step
benchmark of the project (the GPU check's ``network`` section calls it too). Imports torch
alone; each network imports its library when it is built:

* ``hrnet-w48``: timm's ``hrnet_w48`` (``features_only=True, feature_location=''``: the five
  feature maps of the top-down pose/segmentation backbone), input ``(B, 3, 256, 192)``;
  needs timm (``pip install timm``; not one of mmpsa's requirements);
* ``r50-d8``: mmseg's ResNetV1c-50 D8 (the DeepLabV3+ R50-D8 backbone: dilations
  (1, 1, 2, 4), strides (1, 2, 1, 1), contract_dilation), input ``(B, 3, 256, 512)``;
  needs mmseg;
* ``tiny``: a two-stage ResNet of BasicBlocks defined here (torch alone), input
  ``(B, 3, 32, 32)``: for tests and the GPU check's CPU smoke run, not a figure to report.

The PSA backbones get a block in every residual block by
:func:`mmpsa.insertion.insert_psa` (mmseg's through ``PSAResNetV1c``, the same mechanism);
paper variant, parallel, fused and/or literal block. A train step is forward (optionally
under autocast), a scalar fp32 loss over every output, backward and an SGD step, in train
mode. The stock backbone and the PSA backbone(s) start from the same weights and are timed
interleaved (stock, PSA, stock, PSA, ...) after a warm-up, so drifts of a shared machine hit
every model alike; medians are reported, and each PSA row names the path its blocks took
(``block.last_path``).
"""
import collections
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

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

#: ``amp`` names -> autocast dtypes (None: no autocast).
AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {
    'none': None,
    'bf16': torch.bfloat16,
    'fp16': torch.float16
}


def timm_or_raise():
    """timm, or an ImportError that says how to get it."""
    try:
        import timm
    except ImportError as e:
        raise ImportError('the hrnet-w48 network is timm\'s hrnet_w48, and timm is not '
                          f'importable here ({e}); `pip install timm` (it is not one of '
                          'mmpsa\'s requirements)') from e
    return timm


def _timm_hrnet_w48(psa: Optional[dict]) -> nn.Module:
    timm = timm_or_raise()
    model = timm.create_model(
        'hrnet_w48', pretrained=False, features_only=True, feature_location='')
    if psa is not None:
        from mmpsa.insertion import insert_psa
        insert_psa(model, psa)
    return model


def _r50_d8(psa: Optional[dict]) -> nn.Module:
    from mmseg.registry import MODELS

    import mmpsa.seg  # noqa: F401  (registers PSAResNetV1c)
    if psa is None:
        return MODELS.build(dict(type='ResNetV1c', **R50_D8))
    return MODELS.build(dict(type='PSAResNetV1c', psa=psa, **R50_D8))


class _Basic(nn.Module):
    """A ResNet BasicBlock (``conv1``, ``conv2``: what :func:`~mmpsa.insertion.insert_psa`
    recognises)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """Two stages of two BasicBlocks (16 and 32 channels) after a stride-2 stem; returns
    both stages' maps. Torch alone: the step benchmark's test network."""

    res_layers = ['layer1', 'layer2']

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(_Basic(16, 16, 1), _Basic(16, 16, 1))
        self.layer2 = nn.Sequential(_Basic(16, 32, 2), _Basic(32, 32, 1))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x1 = self.layer1(self.stem(x))
        return x1, self.layer2(x1)


def _tiny(psa: Optional[dict]) -> nn.Module:
    model = TinyResNet()
    if psa is not None:
        from mmpsa.insertion import insert_psa
        insert_psa(model, psa)
    return model


Builder = Callable[[Optional[dict]], nn.Module]

#: name -> (title, builder(psa), input (C, H, W)).
NETWORKS: Dict[str, Tuple[str, Builder, Tuple[int, int, int]]] = {
    'hrnet-w48': ('HRNet-W48 (timm)', _timm_hrnet_w48, (3, 256, 192)),
    'r50-d8': ('ResNetV1c-50-D8 (mmseg)', _r50_d8, (3, 256, 512)),
    'tiny': ('tiny ResNet (test network)', _tiny, (3, 32, 32)),
}
BLOCKS = ('fused', 'literal')


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _train_step(model: nn.Module, optim: torch.optim.Optimizer, x: torch.Tensor,
                amp_dtype: Optional[torch.dtype]) -> Tuple[float, float]:
    """One forward + backward + SGD step; returns its (wall, process CPU) seconds.

    On CUDA the device is synchronised before and after, so the wall time is the step's.
    """
    _sync(x.device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outs = model(x)
        outs = [outs] if isinstance(outs, torch.Tensor) else outs
        loss = sum(out.float().square().mean() for out in outs)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    _sync(x.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def paths_taken(model: nn.Module) -> str:
    """What the PSA blocks of ``model`` ran in their last forward, e.g. ``'triton x108'``
    (``'—'`` without blocks)."""
    counts = collections.Counter(
        str(m.last_path) for m in model.modules() if hasattr(m, 'last_path'))
    return ', '.join(f'{path} x{n}' for path, n in sorted(counts.items())) or '—'


def _amp(amp: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    if amp not in AMP_DTYPES:
        raise ValueError(f'amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}')
    return AMP_DTYPES[amp]


def benchmark_network(name: str,
                      blocks: Sequence[str] = BLOCKS,
                      batch: int = 2,
                      reps: int = 5,
                      warmup: int = 1,
                      seed: int = 0,
                      device: Union[str, torch.device] = 'cpu',
                      amp: Union[str, torch.dtype, None] = None,
                      log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Time one train step of the stock backbone and its PSA versions, interleaved.

    Both the wall time and the process CPU time of each step are recorded: on a machine
    shared with other jobs, the CPU time of a single-threaded CPU run (``threads=1``) is the
    steadier measure of the work; the wall time is what a user waits (on a GPU, the CPU
    time is the host's share).

    Args:
        name: A key of :data:`NETWORKS`.
        blocks: PSA block forms to time: ``'fused'`` and/or ``'literal'``.
        batch: Batch size.
        reps: Timed steps per model.
        warmup: Untimed steps per model first.
        seed: Seed for the weights and the input.
        device: Where the models and the input live. Default: ``'cpu'``.
        amp: Autocast dtype for the forward: ``'bf16'``, ``'fp16'``, a ``torch.dtype``, or
            None / ``'none'`` (fp32). Default: None.
        log: Called with a progress line after each round (e.g. ``print``).

    Returns:
        One row per model (``'stock'`` first): network, input, device, amp, block,
        params, median wall and CPU seconds per step, their overheads vs stock in percent,
        and ``ran`` (:func:`paths_taken`).
    """
    if name not in NETWORKS:
        raise ValueError(f'name must be one of {sorted(NETWORKS)}, got {name!r}')
    for block in blocks:
        if block not in BLOCKS:
            raise ValueError(f'blocks entries must be in {BLOCKS}, got {block!r}')
    if reps < 1:
        raise ValueError(f'reps must be >= 1, got {reps!r}')
    amp_dtype = _amp(amp)
    device = torch.device(device)
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
        model.to(device).train()
        optims[key] = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    times: Dict[str, List[Tuple[float, float]]] = {key: [] for key in models}
    for i in range(warmup + reps):
        last = {key: _train_step(model, optims[key], x, amp_dtype) for key, model in models.items()}
        if i >= warmup:
            for key, seconds in last.items():
                times[key].append(seconds)
        if log is not None:
            stage = 'warm-up' if i < warmup else f'rep {i - warmup + 1}/{reps}'
            log(f'{name} {stage}: ' + ', '.join(f'{k} {t[0]:.3f} s (cpu {t[1]:.3f} s)'
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
                device=str(device),
                amp=str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32',
                block=key,
                params=count_params(model),
                wall_s=wall,
                cpu_s=cpu,
                wall_overhead_pct=None if stock else 100 * (wall / base_wall - 1),
                cpu_overhead_pct=None if stock else 100 * (cpu / base_cpu - 1),
                ran=paths_taken(model)))
    return rows


def _pct(value: Optional[float]) -> str:
    return '—' if value is None else f'{value:+.1f} %'


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`benchmark_network` rows."""
    lines = [
        '| network | input | device | amp | PSA block | params (M) | step wall (s) '
        '| overhead wall | step CPU (s) | overhead CPU | ran |',
        '|---|---|---|---|---|---:|---:|---:|---:|---:|---|'
    ]
    for row in rows:
        lines.append(f"| {row['network']} | {row['input']} | {row['device']} | {row['amp']} | "
                     f"{row['block']} | {row['params'] / 1e6:.2f} | {row['wall_s']:.3f} | "
                     f"{_pct(row['wall_overhead_pct'])} | {row['cpu_s']:.3f} | "
                     f"{_pct(row['cpu_overhead_pct'])} | {row['ran']} |")
    return '\n'.join(lines)


def _versions(networks: Sequence[str]) -> str:
    parts = [f'torch {torch.__version__}']
    if 'hrnet-w48' in networks:
        parts.append(f'timm {timm_or_raise().__version__}')
    return ', '.join(parts)


def run(networks: Sequence[str] = ('hrnet-w48', 'r50-d8'),
        blocks: Sequence[str] = BLOCKS,
        batch: int = 2,
        reps: int = 5,
        warmup: int = 1,
        threads: Optional[int] = None,
        seed: int = 0,
        quiet: bool = False,
        device: Union[str, torch.device] = 'cpu',
        amp: Union[str, torch.dtype, None] = None) -> str:
    """Benchmark each network and return a header line and the Markdown table.

    Args:
        networks: Keys of :data:`NETWORKS`.
        blocks: PSA block forms: ``'fused'`` and/or ``'literal'``.
        batch: Batch size.
        reps: Timed steps per model.
        warmup: Untimed steps per model first.
        threads: ``torch.set_num_threads`` (None: torch's default).
        seed: Seed for weights and inputs.
        quiet: No progress lines on stderr.
        device: ``'cpu'`` or ``'cuda'`` (Default: ``'cpu'``).
        amp: Autocast dtype (``'bf16'``, ``'fp16'``; None: fp32).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f'threads must be >= 1, got {threads!r}')
        torch.set_num_threads(threads)
    for name in networks:
        if name not in NETWORKS:
            raise ValueError(f'networks entries must be in {sorted(NETWORKS)}, got {name!r}')
    versions = _versions(networks)  # fail before building anything when timm is missing
    amp_dtype = _amp(amp)
    log = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = []
    for name in networks:
        rows.extend(
            benchmark_network(
                name,
                blocks,
                batch=batch,
                reps=reps,
                warmup=warmup,
                seed=seed,
                device=device,
                amp=amp_dtype,
                log=log))
    where = (
        torch.cuda.get_device_name(device)
        if torch.device(device).type == 'cuda' else f'CPU, {torch.get_num_threads()} thread(s)')
    precision = f'{amp_dtype} autocast'.replace('torch.', '') if amp_dtype else 'fp32'
    header = (f'{where}, {precision}, {versions}; one train step (fwd + bwd + SGD), medians '
              f'of {reps} interleaved reps after {warmup} warm-up; PSA: paper variant, '
              f'parallel, every residual block. CPU = process CPU time (with 1 thread: the '
              f'work, steady on a shared machine).')
    return header + '\n\n' + format_table(rows)
