"""The checkpoint door: a payload ``.pth`` runs nothing through any door, on either unpickling
branch (torch's weights-only + ``add_safe_globals``, and the restricted unpickler of a torch
without it), local or served over http; mmengine's loaders go through the door inside
``checkpoint_door()``; keys and shapes are checked even when a PSA record is present."""
import functools
import http.server
import pickle
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

import mmpsa  # noqa: F401  (registers the allow-list and the schemes)
import mmpsa.compat
from mmpsa.checkpoint import (CheckpointMismatchError, CheckpointReadError,
                              UnsafeCheckpointReadError, check_psa_match, checkpoint_door,
                              fetch_checkpoint, keep_missing_psa, load_into_model, psa_record,
                              read_checkpoint)
from mmpsa.layers import PolarizedSelfAttention


@pytest.fixture(params=['torch-default', 'old-torch'])
def branch(request, monkeypatch) -> str:
    """Both unpickling branches; torch's own default stands for an old torch's
    (``weights_only=False`` wherever a call does not pass it)."""
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    if request.param == 'old-torch':
        monkeypatch.setattr(mmpsa.compat, 'has_add_safe_globals', lambda: False)
    return request.param


@pytest.fixture
def served(tmp_path: Path, monkeypatch) -> Iterator[tuple]:
    """An http.server on 127.0.0.1 serving ``tmp_path/www``; torch's hub cache in tmp_path."""
    www = tmp_path / 'www'
    www.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_simulated_old_torch_takes_the_restricted_unpickler(tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', spy)
    path = tmp_path / 'w.pth'
    torch.save({'w': torch.ones(1)}, path)
    if mmpsa.compat.has_add_safe_globals():  # torch >= 2.4 (torch < 2.4: the branch below)
        read_checkpoint(str(path))
        assert calls[-1]['weights_only'] is True and 'pickle_module' not in calls[-1]
    monkeypatch.setattr(mmpsa.compat, 'has_add_safe_globals', lambda: False)
    read_checkpoint(str(path))
    assert calls[-1]['weights_only'] is False
    assert calls[-1]['pickle_module'] is mmpsa.checkpoint.RESTRICTED_PICKLE


def test_payload_runs_without_the_door(tmp_path, monkeypatch, save_payload):
    """The payload is real: torch's default (old torch) runs it."""
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    marker = tmp_path / 'ran'
    torch.load(save_payload(tmp_path / 'evil.pth', marker))
    assert marker.exists()


def _assert_refused(err, name: str, marker: Path) -> None:
    text = str(err.value)
    assert name in text and 'system' in text and 'allow-list' in text, text
    assert not marker.exists(), 'the payload ran'


def test_payload_refused_by_read_checkpoint(tmp_path, branch, save_payload):
    marker = tmp_path / 'ran'
    path = save_payload(tmp_path / 'evil.pth', marker)
    with pytest.raises(UnsafeCheckpointReadError) as err:
        read_checkpoint(str(path))
    _assert_refused(err, str(path), marker)


def test_payload_refused_over_http(tmp_path, branch, served, save_payload):
    www, base = served
    marker = tmp_path / 'ran'
    save_payload(www / 'evil.pth', marker)
    url = f'{base}/evil.pth'
    with pytest.raises(UnsafeCheckpointReadError) as err:
        read_checkpoint(url)
    _assert_refused(err, url, marker)
    # downloaded to torch's hub cache first, then read as a local file
    assert Path(fetch_checkpoint(url)).is_file()
    assert str(tmp_path / 'torch_home') in fetch_checkpoint(url)


@pytest.mark.parametrize('api', ['CheckpointLoader', 'load_checkpoint', '_load_checkpoint'])
@pytest.mark.parametrize('where', ['local', 'http'])
def test_mmengine_loaders_go_through_the_door_inside_it(tmp_path, branch, served, api, where,
                                                        save_payload):
    from mmengine.runner import checkpoint as mm
    www, base = served
    marker = tmp_path / 'ran'
    save_payload(www / 'evil.pth', marker)
    name = str(www / 'evil.pth') if where == 'local' else f'{base}/evil.pth'
    with checkpoint_door(), pytest.raises(UnsafeCheckpointReadError) as err:
        if api == 'CheckpointLoader':
            mm.CheckpointLoader.load_checkpoint(name, map_location='cpu')
        elif api == 'load_checkpoint':
            mm.load_checkpoint(torch.nn.Linear(1, 1), name, map_location='cpu')
        else:
            mm._load_checkpoint(name, map_location='cpu')
    _assert_refused(err, name, marker)


def test_open_mmlab_names_resolve_through_the_door(tmp_path, branch, served, monkeypatch,
                                                   save_payload):
    """``pretrained='open-mmlab://...'`` (every shipped Cityscapes config's HRNet): the
    name's URL is fetched and read by the door."""
    from mmengine.runner import checkpoint as mm
    www, base = served
    marker = tmp_path / 'ran'
    save_payload(www / 'hrnet.pth', marker)
    monkeypatch.setattr(mm, 'get_external_models', lambda: {'msra/hrnet': f'{base}/hrnet.pth'})
    with checkpoint_door(), pytest.raises(UnsafeCheckpointReadError) as err:
        mm.CheckpointLoader.load_checkpoint('open-mmlab://msra/hrnet', map_location='cpu')
    _assert_refused(err, 'hrnet.pth', marker)


def test_outside_the_door_mmengine_keeps_its_own_loaders():
    from mmengine.runner import checkpoint as mm
    assert not mmpsa.checkpoint.door_active()
    for name, stock in [('x.pth', mm.load_from_local), ('https://a/b.pth', mm.load_from_http),
                        ('open-mmlab://a', mm.load_from_openmmlab)]:
        loader = mm.CheckpointLoader._get_checkpoint_loader(name)
        assert loader.mmpsa_stock is stock


def test_unfetchable_scheme_is_named():
    with pytest.raises(CheckpointReadError, match="'s3://bucket/x.pth'.*local file"):
        read_checkpoint('s3://bucket/x.pth')


def _mmengine_like(path: Path) -> Path:
    """What mmengine's message hub and dataset_meta put in a checkpoint."""
    buf = HistoryBuffer()
    buf.update(0.5)
    buf.update(0.25)
    buf.statistics('min')  # fills _statistics_methods: pickled as getattr(HistoryBuffer, 'min')
    torch.save(
        {
            'meta': {
                'dataset_meta': {
                    'flip_indices': np.array([0, 2, 1], dtype=np.int64),
                    'palette': np.zeros((2, 3), dtype=np.uint8),
                    'dtype': np.dtype('uint8'),
                    'scalar': np.float64(2.5)
                }
            },
            'message_hub': {
                'log_scalars': OrderedDict(loss=buf)
            },
            'state_dict': OrderedDict(w=torch.ones(2), p=torch.nn.Parameter(torch.zeros(3))),
        }, path)
    return path


def test_mmengine_checkpoint_loads_on_both_branches(tmp_path, branch):
    ckpt = read_checkpoint(str(_mmengine_like(tmp_path / 'hub.pth')))
    hub = ckpt['message_hub']['log_scalars']['loss']
    assert isinstance(hub, HistoryBuffer) and hub.mean() == pytest.approx(0.375)
    meta = ckpt['meta']['dataset_meta']
    np.testing.assert_array_equal(meta['flip_indices'], [0, 2, 1])
    assert meta['palette'].dtype == np.uint8 and meta['scalar'] == 2.5
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))


@pytest.mark.parametrize('old_torch', [False, True])
def test_forced_weights_only_variable(tmp_path, monkeypatch, old_torch, save_payload):
    """A user's TORCH_FORCE_WEIGHTS_ONLY_LOAD=1: nothing changes where torch has
    add_safe_globals; on an older torch (which then refuses a pickle_module) the door loads
    with torch's own weights-only set: plain state dicts load, payloads are refused, and
    mmengine's Runner checkpoints are refused with a message naming the variable."""
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    if old_torch:
        monkeypatch.setattr(mmpsa.compat, 'has_add_safe_globals', lambda: False)
    elif not mmpsa.compat.has_add_safe_globals():
        pytest.skip(f'needs torch >= 2.4 (add_safe_globals), this is {torch.__version__}')
    plain = tmp_path / 'plain.pth'
    torch.save({'state_dict': OrderedDict(w=torch.ones(2))}, plain)
    assert torch.equal(read_checkpoint(str(plain))['state_dict']['w'], torch.ones(2))
    marker = tmp_path / 'ran'
    evil = save_payload(tmp_path / 'evil.pth', marker)
    with pytest.raises(UnsafeCheckpointReadError) as err:
        read_checkpoint(str(evil))
    _assert_refused(err, str(evil), marker)
    hub = _mmengine_like(tmp_path / 'hub.pth')
    if not old_torch:  # the variable changes nothing: the allow-list is torch's
        assert isinstance(
            read_checkpoint(str(hub))['message_hub']['log_scalars']['loss'], HistoryBuffer)
    elif mmpsa.compat.torch_version() < (2, 4):  # torch's set lacks mmengine's globals
        with pytest.raises(
                UnsafeCheckpointReadError,
                match='TORCH_FORCE_WEIGHTS_ONLY_LOAD is '
                r'set: on torch .*unset it'):
            read_checkpoint(str(hub))
    # (simulated on a newer torch, torch's process-wide list already holds mmpsa's globals)


class _GetattrEscape:

    def __reduce__(self):
        return (getattr, (HistoryBuffer, 'register_statistics'))


class _BuildOnAClass:
    """A pickle that sets attributes of an allowed class (BUILD on the class itself)."""

    def __reduce__(self):
        return (HistoryBuffer.__new__, (HistoryBuffer, ))


@pytest.mark.parametrize('payload', [_GetattrEscape(), pickle.loads])
def test_other_escapes_refused_on_both_branches(tmp_path, branch, payload):
    path = tmp_path / 'escape.pth'
    torch.save({'x': payload}, path)
    with pytest.raises(UnsafeCheckpointReadError, match='escape.pth'):
        read_checkpoint(str(path))


def test_restricted_unpickler_builds_only_allowed_instances():
    """BUILD on a class object (setting class attributes) is refused."""
    import io

    from mmpsa.checkpoint.allowlist import RestrictedUnpickler, UnsafeCheckpointError

    # GLOBAL HistoryBuffer, {'x': 1}, BUILD
    data = (b'\x80\x02cmmengine.logging.history_buffer\nHistoryBuffer\n}q\x00X\x01\x00\x00\x00xK'
            b'\x01sb.')
    with pytest.raises(UnsafeCheckpointError, match='HistoryBuffer|type'):
        RestrictedUnpickler(io.BytesIO(data)).load()
    assert not hasattr(HistoryBuffer, 'x')


class _Net(torch.nn.Module):
    """A conv, a PSA block and a classifier of ``num_classes``."""

    def __init__(self, num_classes: int = 19, mode: str = 'parallel', psa: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        if psa:
            self.psa = PolarizedSelfAttention(8, mode=mode, fused=False)
        self.cls = torch.nn.Conv2d(8, num_classes, 1)


def _ckpt(model: torch.nn.Module) -> dict:
    return dict(meta=dict(psa=psa_record(model)), state_dict=model.state_dict())


@pytest.mark.parametrize('purpose', ['resume', 'test', 'export', 'attention'])
def test_a_psa_record_does_not_hide_a_shape_mismatch(purpose):
    """A 19-class checkpoint with its (matching) PSA record, for a 5-class config."""
    with pytest.raises(CheckpointMismatchError) as err:
        check_psa_match(_ckpt(_Net(19)), _Net(5), 'c19.pth', purpose)
    text = str(err.value)
    assert "'c19.pth'" in text and 'cls.weight: (19, 8, 1, 1) in the checkpoint' in text


def test_fine_tuning_skips_the_reshaped_head_with_a_warning(capsys):
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmpsa_test_door')
    saved, model = _ckpt(_Net(19)), _Net(5)
    before = model.cls.weight.clone()
    accepted = check_psa_match(saved, model, 'c19.pth', 'load_from')
    out = capsys.readouterr()
    assert 'shape mismatches: cls.weight' in out.out + out.err
    assert accepted == ['cls.bias', 'cls.weight']
    keep_missing_psa(saved, model, accepted)
    model.load_state_dict(saved['state_dict'], strict=True)
    assert torch.equal(model.cls.weight, before)
    assert torch.equal(model.conv.weight, saved['state_dict']['conv.weight'])


def test_evaluation_warns_on_unexpected_keys_and_refuses_missing_ones(capsys):
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmpsa_test_door_eval')
    saved = _ckpt(_Net())
    saved['state_dict']['extra.weight'] = torch.ones(1)
    check_psa_match(saved, _Net(), 'x.pth', 'test')
    out = capsys.readouterr()
    assert 'extra.weight' in out.out + out.err
    with pytest.raises(CheckpointMismatchError, match='extra.weight'):
        check_psa_match(saved, _Net(), 'x.pth', 'resume')
    del saved['state_dict']['conv.weight']
    with pytest.raises(CheckpointMismatchError, match='missing keys: conv.weight'):
        check_psa_match(saved, _Net(), 'x.pth', 'export')


def test_load_into_model_checks_and_loads(tmp_path, branch, save_payload):
    path = tmp_path / 'c19.pth'
    torch.save(_ckpt(_Net(19)), path)
    with pytest.raises(CheckpointMismatchError, match='c19.pth'):
        load_into_model(_Net(5), str(path), 'export')
    model = _Net(19)
    load_into_model(model, str(path), 'attention')
    marker = tmp_path / 'ran'
    with pytest.raises(UnsafeCheckpointReadError):
        load_into_model(_Net(), str(save_payload(tmp_path / 'evil.pth', marker)), 'test')
    assert not marker.exists()
