"""The weights_only allow-list (mmengine checkpoints load, code-running pickles do not), and
checkpoint files that cannot be read fail with an error naming them."""
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint

import mmpsa  # noqa: F401  (registers the allow-list)
from mmpsa.checkpoint import (CheckpointReadError, check_checkpoint_file, history_buffer_getattr,
                              read_checkpoint, safe_globals)

# Globals that run code or reach arbitrary attributes: none may be allowed.
DANGEROUS = {
    'builtins.eval', 'builtins.exec', 'builtins.compile', 'builtins.__import__', 'builtins.open',
    'builtins.setattr', 'builtins.globals', 'builtins.type', 'posix.system', 'os.system',
    'subprocess.Popen', 'functools.partial', 'operator.attrgetter', 'operator.methodcaller',
    'importlib.import_module', 'pickle.loads', 'numpy.load', 'numpy.core.multiarray.frombuffer'
}


def _allowed_names() -> dict:
    names = {}
    for item in torch.serialization.get_safe_globals():
        if isinstance(item, tuple):
            names[item[1]] = item[0]
        else:
            names[f'{item.__module__}.{item.__qualname__}'] = item
    return names


def test_allow_list_holds_no_code_running_global():
    allowed = _allowed_names()
    assert not DANGEROUS & set(allowed), DANGEROUS & set(allowed)
    # The name ``builtins.getattr`` is bound to the restricted substitute, never to getattr.
    assert allowed['builtins.getattr'] is history_buffer_getattr
    assert getattr not in allowed.values()
    # Everything we add is a class (data container) or a data constructor.
    from numpy.core import multiarray
    constructors = {history_buffer_getattr, multiarray._reconstruct, multiarray.scalar}
    for item in safe_globals():
        obj = item[0] if isinstance(item, tuple) else item
        assert isinstance(obj, type) or obj in constructors, obj


def test_getattr_substitute_resolves_only_statistics_methods():
    assert history_buffer_getattr(HistoryBuffer, 'min') is HistoryBuffer.min
    assert history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for obj, name in [(os, 'system'), (HistoryBuffer, 'register_statistics'),
                      (HistoryBuffer, '__init__'), (HistoryBuffer, '__class__'), (np, 'load')]:
        with pytest.raises(pickle.UnpicklingError, match='refused'):
            history_buffer_getattr(obj, name)


def test_message_hub_like_state_round_trips(tmp_path: Path):
    """What mmengine's message hub and dataset_meta put in a checkpoint loads back."""
    buf = HistoryBuffer()
    buf.update(0.5)
    buf.update(0.25)
    ckpt = {
        'meta': {
            'seed': 1,
            'dataset_meta': {
                'flip_indices': np.array([0, 2, 1], dtype=np.int64),
                'weights': np.array([1.0, 1.5], dtype=np.float32),
                'palette': np.zeros((2, 3), dtype=np.uint8),
                'dtype': np.dtype('uint8'),
                'scalar': np.float64(2.5)
            }
        },
        'message_hub': {
            'log_scalars': OrderedDict(loss=buf)
        },
        'state_dict': OrderedDict(w=torch.ones(2)),
    }
    path = tmp_path / 'hub.pth'
    torch.save(ckpt, path)
    loaded = torch.load(path)  # weights_only=True is torch's default here
    hub = loaded['message_hub']['log_scalars']['loss']
    assert isinstance(hub, HistoryBuffer)
    assert hub.mean() == pytest.approx(0.375)
    assert hub.statistics('max') == pytest.approx(0.5)
    meta = loaded['meta']['dataset_meta']
    np.testing.assert_array_equal(meta['flip_indices'], [0, 2, 1])
    assert meta['palette'].dtype == np.uint8 and meta['scalar'] == 2.5
    assert torch.equal(loaded['state_dict']['w'], torch.ones(2))


class _RunsCode:
    """A pickle payload that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


class _GetattrEscape:
    """A payload that tries to reach a non-statistics attribute via getattr."""

    def __reduce__(self):
        return (getattr, (HistoryBuffer, 'register_statistics'))


@pytest.mark.parametrize('loader', ['torch.load', 'mmengine'])
def test_code_running_checkpoint_is_refused(tmp_path: Path, loader: str):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': _RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match='system'):
        if loader == 'torch.load':
            torch.load(path)
        else:
            _load_checkpoint(str(path), map_location='cpu')
    assert not marker.exists(), 'the payload ran'


@pytest.mark.parametrize('loader', ['torch.load', 'mmengine'])
def test_getattr_escape_is_refused(tmp_path: Path, loader: str):
    path = tmp_path / 'escape.pth'
    torch.save({'x': _GetattrEscape()}, path)
    with pytest.raises(pickle.UnpicklingError, match='refused'):
        if loader == 'torch.load':
            torch.load(path)
        else:
            _load_checkpoint(str(path), map_location='cpu')


def _saved(path: Path) -> Path:
    """A small checkpoint in torch's zip format."""
    torch.save({'state_dict': OrderedDict(w=torch.ones(2)), 'meta': {'iter': 3}}, path)
    return path


def test_read_checkpoint_loads_a_complete_file(tmp_path: Path):
    ckpt = read_checkpoint(str(_saved(tmp_path / 'good.pth')))
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2)) and ckpt['meta']['iter'] == 3


def test_missing_checkpoint_is_named(tmp_path: Path):
    missing = str(tmp_path / 'missing.pth')
    with pytest.raises(CheckpointReadError, match='does not exist') as err:
        check_checkpoint_file(missing)
    assert missing in str(err.value)


@pytest.mark.parametrize('damage', ['truncated', 'no_data_pkl'])
def test_incomplete_checkpoint_fails_the_quick_check(tmp_path: Path, damage: str):
    path = tmp_path / 'bad.pth'
    if damage == 'truncated':  # a save killed midway: no central directory at the end
        data = _saved(tmp_path / 'good.pth').read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:  # a zip archive, but not a torch checkpoint
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr('bad/other.txt', 'no pickle here')
    with pytest.raises(CheckpointReadError, match='truncated or corrupt') as err:
        check_checkpoint_file(str(path))
    assert str(path) in str(err.value)


def test_corrupt_pickle_passes_the_quick_check_and_fails_the_read(tmp_path: Path):
    path = _saved(tmp_path / 'corrupt.pth')
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith('/data.pkl'))
    # Local file header: 30 bytes, then the name and the extra field, then the data.
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], 'little')
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], 'little')
    start = info.header_offset + 30 + name_len + extra_len
    data[start:start + info.compress_size] = b'\x00' * info.compress_size
    path.write_bytes(bytes(data))
    check_checkpoint_file(str(path))
    with pytest.raises(CheckpointReadError, match='truncated or corrupt') as err:
        read_checkpoint(str(path))
    assert str(path) in str(err.value)


def test_remote_checkpoint_names_are_left_to_mmengine():
    check_checkpoint_file('https://download.openmmlab.com/no/such/file.pth')
