"""Fixtures shared by the tool, engine and backbone tests."""
import importlib.util
import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, List, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def load_tool() -> Callable[[str], ModuleType]:
    """``load_tool('train')`` imports ``tools/train.py`` as a module (tools/ is no package)."""

    def load(name: str) -> ModuleType:
        path = REPO / 'tools' / f'{name}.py'
        spec = importlib.util.spec_from_file_location(f'psa_tools_{name}', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope='session')
def python_json() -> Callable[..., dict]:
    """``python_json(code, env=None)``: run ``code`` in a fresh interpreter (cwd: the
    checkout) and return the JSON object it prints last; its stderr on failure."""

    def run(code: str, env: Optional[Dict[str, str]] = None) -> dict:
        proc = subprocess.run([sys.executable, '-W', 'ignore', '-c', code],
                              cwd=REPO,
                              env=env,
                              capture_output=True,
                              text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope='module')
def cpu_without_yapf() -> Iterator[None]:
    """Runs in this process: on the CPU, as the subprocesses (CUDA_VISIBLE_DEVICES=''), and
    without mmengine's yapf formatting of config text (cosmetic)."""
    import mmengine.config.config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mmengine.config.config, 'FormatCode', lambda text, **kwargs: (text, False))
        patch.setattr(torch.cuda, 'is_available', lambda: False)
        yield


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the test (two shared cores: more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _psa_block_params(channels: int, mode: str = 'parallel', variant: str = 'paper') -> int:
    """Parameters of one PSA block on ``channels`` = C channels, from mmpsa/layers/psa.py's
    layer list (1x1 convs: C_in * C_out weights, + C_out if biased)."""
    c, h = channels, channels // 2
    if variant == 'paper':  # ch_wv, ch_wq, ch_wz, ln (weight, bias), sp_wv, sp_wq
        return (c * h + h) + (c + 1) + (h * c + c) + 2 * c + (c * h + h) + (c * h + h)
    # official, no biases: conv_q_right, conv_v_right, conv_q_left, conv_v_left ...
    qv = c + c * h + c * h + c * h
    if mode == 'parallel':  # ... and conv_up
        return qv + h * c
    e = h // 4  # ... and conv_up = conv (C/2 -> C/8), LayerNorm([C/8, 1, 1]), conv (C/8 -> C)
    return qv + (h * e + e) + 2 * e + (e * c + c)


@pytest.fixture(scope='session')
def psa_block_params() -> Callable[..., int]:
    """``psa_block_params(C, mode, variant)``: the parameter count of one PSA block."""
    return _psa_block_params


@pytest.fixture(scope='session')
def psa_input_channels() -> Callable[[torch.nn.Module], List[int]]:
    """``psa_input_channels(stock_backbone)``: the channels a PSA gets in each residual block
    of a stock ResNet/HRNet (mmseg's or mmpose's): the input of the block's next conv."""

    def channels(stock: torch.nn.Module) -> List[int]:
        out = []
        for module in stock.modules():
            if type(module).__name__ == 'BasicBlock':
                out.append(module.conv2.in_channels)
            elif type(module).__name__ == 'Bottleneck':
                out.append(module.conv3.in_channels)
        return out

    return channels


class RunsCode:
    """A pickle payload that creates ``marker`` (through ``os.system``) when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


@pytest.fixture(scope='session')
def save_payload() -> Callable[[Path, Path], Path]:
    """``save_payload(path, marker)`` writes a checkpoint-looking file (a state_dict, a meta)
    whose pickle runs ``touch marker``; returns ``path``. The door's tests feed it to every
    entry point and check that ``marker`` never appears."""

    def save(path: Path, marker: Path) -> Path:
        torch.save({
            'state_dict': OrderedDict(w=torch.ones(1)),
            'meta': {
                'x': RunsCode(marker)
            }
        }, path)
        return path

    return save
