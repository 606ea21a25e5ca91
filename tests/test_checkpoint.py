"""The weights_only allow-list (mmengine checkpoints load, code-running pickles do not),
checkpoint files that cannot be read fail with an error naming them (CRCs included), and the
PSA record says which model a checkpoint holds."""
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

import mmpsa  # noqa: F401  (registers the allow-list)
import mmpsa.compat
from mmpsa.checkpoint import (CheckpointMismatchError, CheckpointReadError, check_checkpoint_file,
                              check_psa_match, history_buffer_getattr, keep_missing_psa, psa_record,
                              read_checkpoint, safe_globals, verify_checkpoint_file)
from mmpsa.checkpoint.allowlist import allowed_globals
from mmpsa.layers import PolarizedSelfAttention

# Globals that run code or reach arbitrary attributes: none may be allowed.
DANGEROUS = {
    'builtins.eval', 'builtins.exec', 'builtins.compile', 'builtins.__import__', 'builtins.open',
    'builtins.setattr', 'builtins.globals', 'builtins.type', 'posix.system', 'os.system',
    'subprocess.Popen', 'functools.partial', 'operator.attrgetter', 'operator.methodcaller',
    'importlib.import_module', 'pickle.loads', 'numpy.load', 'numpy.core.multiarray.frombuffer'
}


def _allowed_names() -> dict:
    """torch's process-wide added globals (torch >= 2.4) and the restricted unpickler's
    whole list (every torch)."""
    names = dict(allowed_globals())
    get_safe_globals = getattr(torch.serialization, 'get_safe_globals', None)  # torch >= 2.4
    for item in get_safe_globals() if get_safe_globals else []:
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
    import codecs

    from numpy.core import multiarray
    constructors = {
        history_buffer_getattr, multiarray._reconstruct, multiarray.scalar, codecs.encode
    }
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
    # through the door on every torch; torch's default load too where it is weights-only
    # (torch >= 2.6), as mmengine's own CheckpointLoader calls it
    loaders = [lambda: read_checkpoint(str(path))]
    if mmpsa.compat.torch_version() >= (2, 6):
        loaders.append(lambda: torch.load(path))
    for load in loaders:
        _check_hub_like(load())


def _check_hub_like(loaded: dict) -> None:
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


@pytest.mark.parametrize('loader', ['torch.load', 'door'])
def test_code_running_checkpoint_is_refused(tmp_path: Path, loader: str):
    if loader == 'torch.load' and mmpsa.compat.torch_version() < (2, 6):
        pytest.skip(f"torch.load's default is weights-only from torch 2.6, this is "
                    f'{torch.__version__} (the door refuses on every torch)')
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}, 'x': _RunsCode(marker)}, path)
    with pytest.raises((pickle.UnpicklingError, CheckpointReadError), match='system'):
        if loader == 'torch.load':
            torch.load(path)
        else:
            read_checkpoint(str(path))
    assert not marker.exists(), 'the payload ran'


@pytest.mark.parametrize('loader', ['torch.load', 'door'])
def test_getattr_escape_is_refused(tmp_path: Path, loader: str):
    if loader == 'torch.load' and mmpsa.compat.torch_version() < (2, 6):
        pytest.skip(f"torch.load's default is weights-only from torch 2.6, this is "
                    f'{torch.__version__} (the door refuses on every torch)')
    path = tmp_path / 'escape.pth'
    torch.save({'x': _GetattrEscape()}, path)
    with pytest.raises((pickle.UnpicklingError, CheckpointReadError), match='refused'):
        if loader == 'torch.load':
            torch.load(path)
        else:
            read_checkpoint(str(path))


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
    found = ('without its central directory' if damage == 'truncated' else 'none of them data.pkl')
    with pytest.raises(CheckpointReadError, match=found) as err:
        check_checkpoint_file(str(path))
    assert str(path) in str(err.value) and 'earlier checkpoint of the run' not in str(err.value)


def test_corrupt_pickle_passes_the_quick_check_and_fails_the_read(tmp_path: Path):
    path = _saved(tmp_path / 'corrupt.pth')
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith('/data.pkl'))
    start = _record_offset(path, '/data.pkl')
    data[start:start + info.compress_size] = b'\x00' * info.compress_size
    path.write_bytes(bytes(data))
    check_checkpoint_file(str(path))
    with pytest.raises(CheckpointReadError, match='fails its CRC check') as err:
        read_checkpoint(str(path))
    assert str(path) in str(err.value)


def test_remote_checkpoint_names_are_checked_after_the_download():
    check_checkpoint_file('https://download.openmmlab.com/no/such/file.pth')


def _record_offset(path: Path, suffix: str) -> int:
    """Where the data of the zip record whose name ends with ``suffix`` starts (after the
    30-byte local file header, the name and the extra field)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    data = path.read_bytes()
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], 'little')
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], 'little')
    return info.header_offset + 30 + name_len + extra_len


def test_zeros_inside_a_tensor_record_fail_the_crc_check(tmp_path: Path):
    """torch.load takes the damaged file silently; the CRC check names file and record."""
    path = tmp_path / 'iter_35.pth'
    torch.save(dict(state_dict=dict(small=torch.ones(4), big=torch.ones(4096))), path)
    with zipfile.ZipFile(path) as archive:
        big = max(archive.infolist(), key=lambda i: i.file_size).filename
    data = bytearray(path.read_bytes())
    start = _record_offset(path, big) + 2048
    data[start:start + 4096] = b'\x00' * 4096  # 1,024 float32 zeros
    path.write_bytes(bytes(data))
    loaded = torch.load(path, weights_only=True)['state_dict']['big']
    assert int((loaded == 0).sum()) == 1024  # what a resume would train on
    check_checkpoint_file(str(path))  # the quick check cannot see it
    for check in (verify_checkpoint_file, read_checkpoint):
        with pytest.raises(CheckpointReadError, match='fails its CRC check') as err:
            check(str(path))
        assert str(path) in str(err.value) and big in str(err.value)


def test_legacy_checkpoint_has_no_crc_and_passes(tmp_path: Path):
    path = tmp_path / 'legacy.pth'
    torch.save(dict(state_dict=dict(w=torch.ones(2))), path, _use_new_zipfile_serialization=False)
    verify_checkpoint_file(str(path))
    verify_checkpoint_file('https://download.openmmlab.com/no/such/file.pth')


class _Net(torch.nn.Module):
    """A conv and a PSA block (a head-level block: its own record entry)."""

    def __init__(self, mode: str = 'parallel', variant: str = 'paper', psa: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        if psa:
            self.psa = PolarizedSelfAttention(8, mode=mode, variant=variant, fused=False)


def _ckpt(model: torch.nn.Module, record: bool = True) -> dict:
    meta = dict(psa=psa_record(model)) if record else dict()
    return dict(meta=meta, state_dict=model.state_dict())


def test_psa_record_is_plain_data_per_module():
    assert psa_record(
        _Net('sequential')) == dict(psa=dict(variant='paper', mode='sequential', in_channels=8))
    assert psa_record(_Net(psa=False)) == {}


def test_paper_parallel_to_sequential_resume_is_refused_by_the_record():
    saved, model = _Net('parallel'), _Net('sequential')
    assert saved.state_dict().keys() == model.state_dict().keys()  # keys cannot tell
    check_psa_match(_ckpt(saved, record=False), model, 'p.pth', 'resume')
    with pytest.raises(CheckpointMismatchError) as err:
        check_psa_match(_ckpt(saved), model, 'p.pth', 'resume')
    message = str(err.value)
    assert "'p.pth'" in message and "mode='parallel'" in message
    assert "mode='sequential'" in message and "meta['psa']" in message
    assert 'shape mismatches' not in message  # same keys and shapes: the record tells


@pytest.mark.parametrize('saved, model', [
    (dict(mode='parallel', variant='official'), dict(mode='sequential', variant='official')),
    (dict(mode='parallel', variant='official'), dict(mode='parallel', variant='paper')),
])
def test_psa_p_to_psa_s_and_official_to_paper_are_refused(saved, model):
    for record in (True, False):  # by the record, and by keys and shapes without it
        with pytest.raises(CheckpointMismatchError, match="'s.pth'"):
            check_psa_match(_ckpt(_Net(**saved), record), _Net(**model), 's.pth', 'resume')
    check_psa_match(_ckpt(_Net(**saved)), _Net(**model), 's.pth', 'load_from')  # fine-tuning


@pytest.mark.parametrize('record', [True, False])
def test_stock_checkpoint_test_needs_the_flag(record, caplog):
    stock, model = _ckpt(_Net(psa=False), record), _Net()
    with pytest.raises(CheckpointMismatchError, match='--allow-missing-psa'):
        check_psa_match(stock, model, 'stock.pth', 'test')
    check_psa_match(stock, model, 'stock.pth', 'test', allow_missing_psa=True)
    with pytest.raises(CheckpointMismatchError, match='resume'):
        check_psa_match(stock, model, 'stock.pth', 'resume')


def test_fine_tuning_from_stock_lists_the_psa_blocks_once(capsys):
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmpsa_test_finetune')
    stock, model = _ckpt(_Net(psa=False)), _Net()
    accepted = check_psa_match(stock, model, 'stock.pth', 'load_from')
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count('has no weights for 1 of the 1 PSA blocks') == 1 and ': psa' in text
    assert accepted == sorted(k for k in model.state_dict() if k.startswith('psa.'))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep_missing_psa(stock, model, accepted)  # mmengine's loader lists no missing key then
    model.load_state_dict(stock['state_dict'], strict=True)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in accepted)
    check_psa_match(_ckpt(_Net()), _Net(), 'same.pth', 'load_from')
    out = capsys.readouterr()
    assert 'PSA' not in out.out + out.err


def test_unknown_purpose_is_refused():
    with pytest.raises(ValueError, match="got 'train'"):
        check_psa_match(_ckpt(_Net()), _Net(), 'x.pth', 'train')
