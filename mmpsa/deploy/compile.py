"""torch.compile and TorchScript checks of PSA models.

The fused block runs plain ATen ops under ``torch.compiler.is_compiling()`` and
``torch.jit`` tracing (:mod:`mmpsa.layers.psa_fused`), so dynamo sees one graph and a
trace holds ordinary ops. :func:`compile_parity` trains a tiny config twice through
mmengine's Runner, eager and with the ``compile`` config key (mmengine compiles
``train_step``), and returns both loss curves.
"""
import copy
import uuid
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook


def dynamo_graphs(module: nn.Module, *inputs: torch.Tensor) -> Tuple[int, int]:
    """``(graphs, graph breaks)`` that ``torch._dynamo.explain`` finds in ``module(*inputs)``."""
    import torch._dynamo
    explanation = torch._dynamo.explain(module)(*inputs)
    return explanation.graph_count, explanation.graph_break_count


class _LossRecorder(Hook):
    """Keeps the loss of every training iteration."""

    def __init__(self) -> None:
        self.losses: List[float] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.losses.append(float(outputs['loss'].detach()))


def train_losses(cfg: Config,
                 iters: int,
                 compile_cfg: Union[None, bool, dict] = None) -> List[float]:
    """Train ``cfg`` for ``iters`` iterations (no validation, no checkpoint) and return
    the losses; ``compile_cfg`` goes into the config's ``compile`` key.

    Args:
        cfg: A training config with its data and ``work_dir`` set (not modified).
        iters: Iterations.
        compile_cfg: ``True`` or ``dict(backend=...)`` for torch.compile; None: eager.
    """
    from mmpsa.apis.runner import build_runner
    if iters < 1:
        raise ValueError(f'iters must be >= 1, got {iters!r}')
    cfg = copy.deepcopy(cfg)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters + 1)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint = None
    cfg.log_level = 'WARNING'
    # one visualizer per Runner (a reused instance would write into the first work_dir)
    cfg.visualizer.name = f'visualizer_{uuid.uuid4().hex[:8]}'
    if compile_cfg is not None:
        cfg.compile = compile_cfg
    runner = build_runner(cfg)
    recorder = _LossRecorder()
    runner.register_hook(recorder, priority='LOWEST')
    runner.train()
    return recorder.losses


def compile_parity(config: Union[str, Path],
                   data_root: Union[str, Path],
                   work_dir: Union[str, Path],
                   iters: int = 3,
                   backend: str = 'aot_eager',
                   cfg_options: Optional[dict] = None) -> Tuple[List[float], List[float]]:
    """The losses of a tiny config trained eager and under torch.compile, same seed.

    Args:
        config: A tiny mmpsa config (``mmpsa/datasets/tiny.py``).
        data_root: Its generated data (:func:`mmpsa.datasets.tiny.make_tiny_data`).
        work_dir: Where the two runs write (``eager/``, ``compiled/``).
        iters: Training iterations.
        backend: The torch.compile backend (``'inductor'``: minutes on a CPU).
        cfg_options: Config overrides.

    Returns:
        ``(eager losses, compiled losses)``.
    """
    from mmpsa.datasets.tiny import tiny_config
    runs = []
    for name, compile_cfg in (('eager', None), ('compiled', dict(backend=backend))):
        cfg = tiny_config(config, data_root, Path(work_dir) / name, cfg_options)
        runs.append(train_losses(cfg, iters, compile_cfg))
    return runs[0], runs[1]
