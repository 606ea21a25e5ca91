"""Fixtures shared by the tool and engine tests."""
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

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


@pytest.fixture(scope='module')
def cpu_without_yapf() -> Iterator[None]:
    """Runs in this process: on the CPU, as the subprocesses (CUDA_VISIBLE_DEVICES=''), and
    without mmengine's yapf formatting of config text (cosmetic)."""
    import mmengine.config.config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mmengine.config.config, 'FormatCode', lambda text, **kwargs: (text, False))
        patch.setattr(torch.cuda, 'is_available', lambda: False)
        yield
