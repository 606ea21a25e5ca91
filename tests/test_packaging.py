"""mmpsa as a package: the config root, ``_base_ = 'mmpsa::...'``, and a wheel that runs from an
empty folder (``mim search``, ``mim run``)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from mmengine.config import Config

import mmpsa  # noqa: F401  (enables mmpsa:: bases)
from mmpsa.utils import paths
from mmpsa.utils.package_configs import enable_package_configs

REPO = Path(__file__).resolve().parents[1]
TINY_SEG = 'mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
# a user's config on an mmpsa base, with the idiom that needs the right registry scope
USER_CONFIG = """_base_ = '{base}'
test_pipeline = _base_.test_pipeline
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
"""


def scopes(node) -> set:
    """Every ``_scope_`` value in a config dict/list tree."""
    if isinstance(node, dict):
        found = {node['_scope_']} if '_scope_' in node else set()
        return found.union(*(scopes(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(scopes(v) for v in node))
    return set()


def test_configs_root_of_the_checkout():
    # the editable install imports mmpsa from the checkout: its configs/ is the root
    assert paths.configs_root() == REPO / 'configs'


def test_configs_root_of_a_wheel_is_its_mim_folder(tmp_path, monkeypatch):
    (tmp_path / 'mmpsa' / '.mim' / 'configs' / '_base_').mkdir(parents=True)
    (tmp_path / 'mmpsa' / '.mim' / 'configs' / '_base_' / 'psa_runtime.py').touch()
    monkeypatch.setattr(paths, 'package_root', lambda: tmp_path / 'mmpsa')
    assert paths.configs_root() == tmp_path / 'mmpsa' / '.mim' / 'configs'


def test_configs_root_missing_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, 'package_root', lambda: tmp_path / 'mmpsa')
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'mmpsa' / '.mim')):
        paths.configs_root()


def test_config_path_with_and_without_prefix():
    assert paths.config_path('mmpsa::' + TINY_SEG) == REPO / 'configs' / TINY_SEG
    assert paths.config_path(TINY_SEG) == REPO / 'configs' / TINY_SEG
    with pytest.raises(FileNotFoundError, match="'mmseg/nope.py'"):
        paths.config_path('mmpsa::mmseg/nope.py')


def test_mmpsa_base_reads_as_its_path(tmp_path):
    (tmp_path / 'by_name.py').write_text(USER_CONFIG.format(base='mmpsa::' + TINY_SEG))
    (tmp_path / 'by_path.py').write_text(USER_CONFIG.format(base=REPO / 'configs' / TINY_SEG))
    by_name = Config.fromfile(str(tmp_path / 'by_name.py')).to_dict()
    assert by_name == Config.fromfile(str(tmp_path / 'by_path.py')).to_dict()
    assert 'mmpsa' not in scopes(by_name)
    assert by_name['default_scope'] == 'mmseg'


def test_mmpsa_base_builds_model_and_base_pipeline(tmp_path):
    from mmcv.transforms import Compose
    from mmengine.registry import MODELS, init_default_scope
    (tmp_path / 'user.py').write_text(USER_CONFIG.format(base='mmpsa::' + TINY_SEG))
    cfg = Config.fromfile(str(tmp_path / 'user.py'))
    init_default_scope(cfg.default_scope)
    pipeline = Compose(cfg.val_dataloader.dataset.pipeline)
    assert type(pipeline.transforms[-1]).__name__ == 'PackSegInputs'
    model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == 'PSAHRNet'


def test_enable_package_configs_wraps_once():
    enable_package_configs()
    enable_package_configs()
    assert not hasattr(Config._get_cfg_path.mmpsa_original, 'mmpsa_original')


def test_tools_load_mmpsa_config_names():
    from mmpsa.apis.runner import load_config
    cfg = load_config('mmpsa::' + TINY_SEG)
    assert cfg.to_dict() == Config.fromfile(str(REPO / 'configs' / TINY_SEG)).to_dict()


# --- the wheel ---------------------------------------------------------------------------

BIN = Path(sys.executable).parent


def run(args, cwd: Path, site: Path, timeout: int = 300) -> str:
    """Run a command with only the wheel's folder on PYTHONPATH; its output, checked."""
    env = dict(os.environ, PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    proc = subprocess.run([str(a) for a in args],
                          cwd=cwd,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """A wheel of the working tree (its tracked and new files, as a fresh clone has them),
    built with ``MMPSA_WITH_EXT=0``: no compile of mmpsa/csrc (1-2 min), the block runs its
    plain-ops path."""
    tmp = tmp_path_factory.mktemp('wheel')
    files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
                           cwd=REPO,
                           capture_output=True,
                           text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (tmp / 'src' / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp / 'src' / name)
    subprocess.run([
        sys.executable, '-m', 'pip', 'wheel', '-q', '--no-build-isolation', '--no-deps', '-w',
        str(tmp / 'dist'),
        str(tmp / 'src')
    ],
                   env=dict(os.environ, MMPSA_WITH_EXT='0'),
                   check=True,
                   timeout=300)
    built, = (tmp / 'dist').glob('mmpsa-*.whl')
    return built


def test_wheel_holds_configs_tools_and_model_index(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    expected = [
        'mmpsa/.mim/model-index.yml', 'mmpsa/.mim/tools/train.py',
        'mmpsa/.mim/configs/_base_/psa_runtime.py', f'mmpsa/.mim/configs/{TINY_SEG}'
    ]
    expected += [f'mmpsa/.mim/{metafile}' for metafile in index['Import']]
    assert [name for name in expected if name not in names] == []
    assert 'mmpsa-0.1.0.dist-info/licenses/LICENSE' in names
    assert not any('__pycache__' in name for name in names)


def test_wheel_runs_from_an_empty_folder(wheel, tmp_path):
    site, work = tmp_path / 'site', tmp_path / 'empty'
    work.mkdir()
    subprocess.run([
        sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
        str(site),
        str(wheel)
    ],
                   check=True,
                   timeout=300)
    origin = run(
        [sys.executable, '-c', "import importlib.util as u; "
         "print(u.find_spec('mmpsa').origin)"], work, site)
    assert origin.strip() == str(site / 'mmpsa' / '__init__.py')

    # mim lists the models of the wheel's model-index.yml
    listing = run([BIN / 'mim', 'search', 'mmpsa'], work, site)
    assert 'config id: psa-p_fcn_hr48_4xb2-80k_cityscapes-512x1024' in listing
    # mim runs the wheel's tools; a user config on an mmpsa:: base trains and validates
    run([BIN / 'mim', 'run', 'mmpsa', 'make_tiny_cityscapes', 'data/tiny_cityscapes'], work, site)
    (work / 'user.py').write_text(USER_CONFIG.format(base='mmpsa::' + TINY_SEG))
    log = run([
        BIN / 'mim', 'run', 'mmpsa', 'train', 'user.py', '--work-dir', 'run', '--cfg-options',
        'train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2'
    ], work, site)
    assert str(site / 'mmpsa' / '.mim' / 'tools' / 'train.py') in log
    assert 'mIoU' in log
    assert (work / 'run' / 'iter_2.pth').is_file()


def test_the_compiled_extension_carries_no_debug_info():
    """A release build of ``mmpsa._ext`` (setup.py: ``-g0``, ``-s``) is well under 2 MB; with
    Python's default ``-g`` it was 27.9 MB, 27.3 MB of it debug info. The set-up's editable
    install and a wheel build compile with the same flags."""
    import importlib.util
    spec = importlib.util.find_spec('mmpsa._ext')
    if spec is None or spec.origin is None:
        pytest.skip('mmpsa._ext is not built here (MMPSA_WITH_EXT=0)')
    so = Path(spec.origin)
    assert so.stat().st_size <= 2 * 2**20, f'{so}: {so.stat().st_size} bytes'
    sections = subprocess.run(['readelf', '-S', str(so)], capture_output=True, text=True)
    if sections.returncode == 0:
        assert '.debug_info' not in sections.stdout
