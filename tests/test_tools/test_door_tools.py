"""The checkpoint door seen from the tools (issue 26): a payload ``.pth`` whose pickle calls
``os.system`` (it would create a marker file) through ``tools/test.py``, ``tools/train.py``
(``--resume``, ``load_from``, a ``pretrained=`` URL) and the released-weights converter,
local and served over ``http://127.0.0.1`` by a server these tests start and stop; the
19-vs-5-class checkpoint with its PSA record at test and resume; fine-tuning through
``load_from`` still working.

Each tool runs in this process (``main(argv)``) on one tiny seg config, trained once for the
module by ``tools/train.py``. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` stands for an older
torch's default everywhere, so any read that bypassed the door would run the payload; the
``old-torch`` cases also take the door's restricted-unpickler branch (a torch without
``add_safe_globals``, simulated).
"""
import functools
import http.server
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest
import torch

import mmpsa.compat
from mmpsa.checkpoint import read_checkpoint
from mmpsa.datasets.tiny import TINY_SEG

FIVE = ('road', 'sidewalk', 'building', 'wall', 'fence')

BASE_CFG = '''
_base_ = [{base!r}]
train_dataloader = dict(batch_size=2, dataset=dict(data_root={data!r}))
val_dataloader = dict(dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=100)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
'''

# The same model with a 5-class head, on the 5 classes' subset of the data (mmseg maps the
# other labels to the ignore index).
FIVE_CFG = f'''
_base_ = ['./base.py']
model = dict(decode_head=dict(num_classes=5))
train_dataloader = dict(dataset=dict(metainfo=dict(classes={FIVE!r})))
val_dataloader = dict(dataset=dict(metainfo=dict(classes={FIVE!r})))
test_dataloader = dict(dataset=dict(metainfo=dict(classes={FIVE!r})))
'''

pytestmark = pytest.mark.usefixtures('cpu_without_yapf')


@pytest.fixture(scope='module')
def world(tmp_path_factory) -> Iterator[Dict]:
    """Tiny data and configs, a loopback http server, and the checkpoint of 2 iterations of
    ``tools/train.py`` (19 classes, with its PSA record)."""
    from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes

    root = tmp_path_factory.mktemp('door_tools')
    make_tiny_cityscapes(root / 'city', num_train=2, num_val=1, size=(64, 128), seed=0)
    (root / 'base.py').write_text(BASE_CFG.format(base=str(TINY_SEG), data=f'{root}/city/'))
    (root / 'five.py').write_text(FIVE_CFG)
    www = root / 'www'
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        # an older torch's default wherever a call does not pass weights_only
        patch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
        patch.setenv('TORCH_HOME', str(root / 'torch_home'))  # downloads stay in here
        torch.set_num_threads(1)
        thread.start()
        try:
            yield dict(
                root=root,
                base=str(root / 'base.py'),
                five=str(root / 'five.py'),
                www=www,
                url=f'http://127.0.0.1:{server.server_address[1]}',
                trained=_train_once(root))
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
            torch.set_num_threads(threads)


def _names(name: str) -> List[str]:
    """Options that keep each in-process run's logs and visualizer apart."""
    return [f'experiment_name={name}', f'visualizer.name={name}']


def _train_once(root: Path) -> Path:
    from mmpsa.apis.runner import train
    train(
        str(root / 'base.py'),
        work_dir=str(root / 'trained'),
        cfg_options=dict(experiment_name='door-trained', **{'visualizer.name': 'door-trained'}))
    ckpt = root / 'trained' / 'iter_2.pth'
    assert read_checkpoint(ckpt)['meta']['psa']['backbone']['blocks'] == 9
    return ckpt


@pytest.fixture(params=['torch-default', 'old-torch'])
def branch(request, monkeypatch) -> str:
    """The door's two unpickling branches."""
    if request.param == 'old-torch':
        monkeypatch.setattr(mmpsa.compat, 'has_add_safe_globals', lambda: False)
    return request.param


def _payload(world: Dict, tmp_path: Path, name: str, where: str, save_payload: Callable) -> tuple:
    """A payload checkpoint, local or served: (its name for the tool, the marker)."""
    marker = tmp_path / 'payload_ran'
    if where == 'local':
        return str(save_payload(tmp_path / name, marker)), marker
    save_payload(world['www'] / name, marker)
    return f'{world["url"]}/{name}', marker


def _refused(exit_info, name: str, marker: Path) -> str:
    """The tool stopped with one line naming the file and the refused global; nothing ran."""
    message = str(exit_info.value.code)
    assert not marker.exists(), 'the payload ran'
    assert message.startswith('error: ') and name in message, message
    assert 'system' in message and 'allow-list' in message, message
    return message


@pytest.mark.parametrize('where', ['local', 'http'])
def test_payload_through_tools_test(world, tmp_path, load_tool, branch, where, save_payload):
    name, marker = _payload(world, tmp_path, f'test_{where}_{branch}.pth', where, save_payload)
    with pytest.raises(SystemExit) as exit_info:
        load_tool('test').main([world['base'], name, '--work-dir', str(tmp_path / 'w')])
    _refused(exit_info, name, marker)


@pytest.mark.parametrize('where', ['local', 'http'])
def test_payload_through_the_converter(world, tmp_path, load_tool, branch, where, save_payload):
    name, marker = _payload(world, tmp_path, f'released_{where}_{branch}.pth', where, save_payload)
    dst = tmp_path / 'converted.pth'
    with pytest.raises(SystemExit) as exit_info:
        load_tool('model_converters/psa_official_to_mmseg').main([name, str(dst)])
    _refused(exit_info, name, marker)
    assert not dst.exists()


@pytest.mark.parametrize('how', ['resume', 'load_from'])
def test_payload_through_tools_train(world, tmp_path, load_tool, branch, how, save_payload):
    where = 'local' if how == 'resume' else 'http'
    name, marker = _payload(world, tmp_path, f'{how}_{branch}.pth', where, save_payload)
    chosen = ['--resume', name] if how == 'resume' else []
    options = [f'load_from={name}'] if how == 'load_from' else []
    with pytest.raises(SystemExit) as exit_info:
        load_tool('train').main(
            [world['base'], '--work-dir', str(tmp_path / 'w')] + chosen + ['--cfg-options'] +
            options + _names(f'door-{how}-{branch}'))
    _refused(exit_info, name, marker)
    assert not list((tmp_path / 'w').glob('iter_*.pth'))  # it did not train


def test_payload_behind_a_pretrained_url(world, tmp_path, load_tool, branch, save_payload):
    """mmseg's ``pretrained=`` (the backbone's ``init_cfg=dict(type='Pretrained')``), as
    every shipped Cityscapes config inherits it, read by mmengine's http scheme."""
    name, marker = _payload(world, tmp_path, f'hrnet_{branch}.pth', 'http', save_payload)
    with pytest.raises(SystemExit) as exit_info:
        load_tool('train').main([
            world['base'], '--work-dir',
            str(tmp_path / 'w'), '--cfg-options', f'model.pretrained={name}'
        ] + _names(f'door-pretrained-{branch}'))
    _refused(exit_info, name, marker)
    assert not list((tmp_path / 'w').glob('iter_*.pth'))


def _mismatch(exit_info, ckpt: Path, purpose: str) -> None:
    message = str(exit_info.value.code)
    assert f'{purpose}: checkpoint {str(ckpt)!r} does not hold the model' in message, message
    assert "its PSA record (meta['psa'])" in message  # the record is there and agrees ...
    assert ('shape mismatches: decode_head.conv_seg.weight: (19, 120, 1, 1) in the checkpoint, '
            '(5, 120, 1, 1) in the model') in message  # ... and does not hide the head


def test_19_class_checkpoint_is_not_tested_with_a_5_class_config(world, tmp_path, load_tool):
    ckpt = world['trained']
    with pytest.raises(SystemExit) as exit_info:
        load_tool('test').main([world['five'], str(ckpt), '--work-dir', str(tmp_path / 'w')])
    _mismatch(exit_info, ckpt, 'test')


def test_19_class_checkpoint_does_not_resume_as_5_classes(world, tmp_path, load_tool):
    ckpt = world['trained']
    with pytest.raises(SystemExit) as exit_info:
        load_tool('train').main([
            world['five'], '--work-dir',
            str(tmp_path / 'w'), '--resume',
            str(ckpt), '--cfg-options', *_names('door-resume-5')
        ])
    _mismatch(exit_info, ckpt, 'resume')
    assert not list((tmp_path / 'w').glob('iter_*.pth'))


def test_fine_tuning_the_19_class_checkpoint_to_5_classes(world, tmp_path, load_tool, capsys):
    """``load_from``: the reshaped head is skipped with a warning, the rest is loaded (another
    seed's initialisation is one AdamW step, at most lr, from the checkpoint's weights), and
    the run trains and saves a 5-class checkpoint."""
    ckpt = world['trained']
    work_dir = tmp_path / 'w'
    load_tool('train').main([
        world['five'], '--work-dir',
        str(work_dir), '--cfg-options', f'load_from={ckpt}', 'train_cfg.max_iters=1',
        'default_hooks.checkpoint.interval=1', 'randomness.seed=1', *_names('door-finetune')
    ])
    out = capsys.readouterr().out
    assert 'tensors of other shapes are skipped' in out
    assert 'decode_head.conv_seg.weight: (19, 120, 1, 1) in the checkpoint' in out
    tuned = read_checkpoint(work_dir / 'iter_1.pth')['state_dict']
    loaded = read_checkpoint(ckpt)['state_dict']
    assert tuned['decode_head.conv_seg.weight'].shape == (5, 120, 1, 1)
    for key in ('backbone.conv1.weight', 'backbone.stage2.0.branches.0.0.psa.conv_up.weight'):
        torch.testing.assert_close(tuned[key], loaded[key], rtol=0, atol=1.1e-2)
