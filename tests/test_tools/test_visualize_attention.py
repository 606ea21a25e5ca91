"""tools/analysis_tools/visualize_attention.py: PNGs of a_sp over the image and a_ch strips,
seg and pose."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmpsa.apis.attention import capture_attention, psa_blocks, select_blocks
from mmpsa.datasets.tiny import TINY_POSE, TINY_SEG, make_tiny_data, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('scope, config', [('mmseg', TINY_SEG), ('mmpose', TINY_POSE)])
def test_tool_writes_non_constant_pictures(tmp_path: Path, scope: str, config: Path):
    from mmpsa.apis.attention import visualize_attention
    data = make_tiny_data(tmp_path / 'data', scope)
    image = sorted((data / ('leftImg8bit/val' if scope == 'mmseg' else 'val2017')
                    ).rglob('*.png' if scope == 'mmseg' else '*.jpg'))[0]
    cfg = tiny_config(config, data)
    cfg_file = tmp_path / 'cfg.py'
    cfg.dump(str(cfg_file))
    visualize_attention(str(cfg_file), None, [str(image)], str(tmp_path / "out"), num_blocks=3)
    out = tmp_path / 'out' / f'{image.stem}_attention.png'
    pixels = np.asarray(Image.open(out).convert('RGB'))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 500  # 3 rows of map + strip
    assert pixels.std() > 10, 'the picture is (nearly) constant'


def test_hooks_capture_maps_of_the_chosen_blocks():
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    cfg = tiny_config(TINY_SEG, '/nonexistent')
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model).eval()
    names = select_blocks(list(psa_blocks(model)), num=2)
    assert len(names) == 2
    with capture_attention(model, names) as maps, torch.no_grad():
        model._forward(torch.rand(1, 3, 64, 128))
    for name in names:
        c = psa_blocks(model)[name].in_channels
        assert maps[name]['a_ch'].shape == (1, c, 1, 1)
        assert maps[name]['a_sp'].shape[:2] == (1, 1)
    assert maps['__input__']['image'].shape == (1, 3, 64, 128)
    with pytest.raises(ValueError, match='matches no PSA block'):
        select_blocks(names, pattern='nothing-like-this')
