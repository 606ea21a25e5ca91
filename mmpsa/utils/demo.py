"""The main job (``make demo``): stock vs PSA_p vs PSA_s on the built-in tiny data.

For one segmentation family (a narrow HRNet + FCN, mmseg's runner, IoUMetric) and one
pose family (a narrow top-down HRNet, mmpose's runner, CocoMetric), each model is trained
and evaluated with a fixed seed; the stock model is the same config with ``psa=None``
(bit for bit the stock backbone). One table comes out (params, FLOPs, train time, metric),
with the attention maps of the PSA models and every run's logs under ``out_dir``.
The data is synthetic: the table says how these models do on it, nothing about Cityscapes
or COCO.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from mmengine.hooks import Hook

from mmpsa.apis.complexity import measure
from mmpsa.apis.runner import build_runner
from mmpsa.utils.tiny import TINY_POSE, TINY_SEG, make_tiny_data, tiny_config

# name -> (scope, config, psa override, metric key, metric label)
SEG_PSA = dict(variant='official', stages=(False, True, True, True))
POSE_PSA = dict(variant='paper')
RUNS = {
    'seg/stock': ('mmseg', TINY_SEG, None),
    'seg/psa-p': ('mmseg', TINY_SEG, dict(mode='parallel', **SEG_PSA)),
    'seg/psa-s': ('mmseg', TINY_SEG, dict(mode='sequential', **SEG_PSA)),
    'pose/stock': ('mmpose', TINY_POSE, None),
    'pose/psa-p': ('mmpose', TINY_POSE, dict(mode='parallel', **POSE_PSA)),
    'pose/psa-s': ('mmpose', TINY_POSE, dict(mode='sequential', **POSE_PSA)),
}
METRIC = {'mmseg': ('mIoU', 'mIoU'), 'mmpose': ('coco/AP', 'AP')}


@dataclass
class DemoRow:
    """One trained and evaluated model."""

    name: str
    params: int
    flops: int
    input_hw: tuple
    train_s: float
    metric_name: str
    metric: float


class _KeepMetrics(Hook):
    """Keeps the last validation metrics of a run."""

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self.metrics: Dict[str, float] = {}

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        self.metrics = dict(metrics or {})


def run_one(name: str, out_dir: Path, data_root: Path) -> DemoRow:
    """Train and validate one model of :data:`RUNS`; return its row."""
    scope, config, psa = RUNS[name]
    work_dir = out_dir / 'work_dirs' / name.replace('/', '_')
    cfg = tiny_config(config, data_root, work_dir, cfg_options={'model.backbone.psa': psa})
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', by_epoch=scope == 'mmpose', interval=10**6, save_last=True)
    cost = measure(cfg)
    runner = build_runner(cfg)
    keeper = _KeepMetrics()
    runner.register_hook(keeper)
    start = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - start
    key, label = METRIC[scope]
    if key not in keeper.metrics:
        raise RuntimeError(f'{name}: validation gave no {key!r}: {keeper.metrics}')
    value = float(keeper.metrics[key]) * (100.0 if scope == 'mmpose' else 1.0)
    return DemoRow(name, cost.params, cost.flops, cost.input_shape[1:], train_s, label, value)


def format_rows(rows: List[DemoRow]) -> str:
    """The demo table in Markdown."""
    lines = [
        '| model | input | params (M) | FLOPs (M) | train time (s) | metric |',
        '|---|---|---:|---:|---:|---:|'
    ]
    for r in rows:
        lines.append(f'| {r.name} | {r.input_hw[0]}x{r.input_hw[1]} | {r.params / 1e6:.3f} '
                     f'| {r.flops / 1e6:.1f} | {r.train_s:.1f} '
                     f'| {r.metric_name} {r.metric:.1f} |')
    return '\n'.join(lines)


def run_demo(out_dir: str = 'outputs/demo', names: Optional[List[str]] = None) -> List[DemoRow]:
    """Run the demo and write ``results.md``, ``results.json`` and attention maps.

    Args:
        out_dir: Output folder (git-ignored ``outputs/`` by default).
        names: Subset of :data:`RUNS` (default: all).

    Returns:
        The rows of the table.
    """
    from mmpsa.apis.attention import visualize_attention
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        'mmseg': make_tiny_data(out / 'data' / 'tiny_cityscapes', 'mmseg'),
        'mmpose': make_tiny_data(out / 'data' / 'tiny_coco', 'mmpose')
    }
    rows = []
    for name in names or list(RUNS):
        scope = RUNS[name][0]
        print(f'\n=== demo: training {name} ({scope}) ===', flush=True)
        rows.append(run_one(name, out, data[scope]))
        print(format_rows(rows[-1:]), flush=True)
    table = format_rows(rows)
    (out / 'results.md').write_text('# mmpsa demo (synthetic tiny data; CPU)\n\n' + table + '\n')
    (out / 'results.json').write_text(json.dumps([asdict(r) for r in rows], indent=2))
    # Attention maps of each trained PSA model on two validation images.
    pictures = []
    for name, (scope, config, psa) in RUNS.items():
        if psa is None or (names and name not in names):
            continue
        work_dir = out / 'work_dirs' / name.replace('/', '_')
        ckpt = (work_dir / 'last_checkpoint').read_text().strip()
        cfg = tiny_config(config, data[scope], work_dir, cfg_options={'model.backbone.psa': psa})
        if scope == 'mmseg':
            images = sorted((data[scope] / 'leftImg8bit' / 'val').rglob('*.png'))[:2]
        else:
            images = sorted((data[scope] / 'val2017').glob('*.jpg'))[:2]
        pictures += visualize_attention(cfg, ckpt, [str(p) for p in images],
                                        str(out / 'attention' / name.replace('/', '_')))
    print('\n' + table)
    print(f'\nResults: {out / "results.md"}; attention maps: {out / "attention"} '
          f'({len(pictures)} PNGs); logs and checkpoints: {out / "work_dirs"}')
    return rows
