"""OpenMMLab's inferencers with mmpsa configs: ``MMSegInferencer`` and ``MMPoseInferencer``.

Each runs a tiny mmpsa config with a checkpoint (the built model's weights and dataset meta,
saved as a runner saves them), writes its visualisation and predictions, and gives what the
library's own ``init_model`` + ``inference_model``/``inference_topdown`` give.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import mmpsa  # noqa: F401  (registers)
from mmpsa.utils.paths import configs_root

TINY_SEG = configs_root() / 'mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
TINY_POSE = configs_root() / 'mmpose/tiny/td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py'


def save_checkpoint(model: torch.nn.Module, dataset_meta: dict, path: Path) -> str:
    """A checkpoint of ``model`` with ``meta.dataset_meta``, as mmengine's runner writes one."""
    from mmengine.runner import save_checkpoint as mmengine_save
    from mmengine.runner.checkpoint import weights_to_cpu
    mmengine_save(
        dict(state_dict=weights_to_cpu(model.state_dict()), meta=dict(dataset_meta=dataset_meta)),
        str(path))
    return str(path)


def random_image(path: Path, height: int, width: int) -> str:
    """A random RGB image file (seeded)."""
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)
    return str(path)


def test_mmseg_inferencer(tmp_path, one_torch_thread):
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.apis import MMSegInferencer, inference_model, init_model
    from mmseg.registry import MODELS
    from mmseg.utils import get_classes, get_palette

    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(TINY_SEG)).model)
    model.init_weights()
    meta = dict(classes=get_classes('cityscapes'), palette=get_palette('cityscapes'))
    checkpoint = save_checkpoint(model, meta, tmp_path / 'tiny.pth')
    image = random_image(tmp_path / 'street.png', 128, 256)

    inferencer = MMSegInferencer(model=str(TINY_SEG), weights=checkpoint, device='cpu')
    sample = inferencer(image, return_datasamples=True)
    out = tmp_path / 'out'
    result = inferencer(image, out_dir=str(out))

    reference = inference_model(init_model(str(TINY_SEG), checkpoint, device='cpu'), image)
    torch.testing.assert_close(sample.seg_logits.data, reference.seg_logits.data)
    labels = reference.pred_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(result['predictions'], labels)
    vis, = (out / 'vis').iterdir()
    assert cv2.imread(str(vis)).shape == (128, 256, 3)
    pred, = (out / 'pred').iterdir()
    np.testing.assert_array_equal(cv2.imread(str(pred), cv2.IMREAD_UNCHANGED), labels)


def test_mmpose_inferencer_whole_image(tmp_path, one_torch_thread):
    pytest.importorskip('mmpose')
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpose.apis import MMPoseInferencer, inference_topdown, init_model
    from mmpose.apis.inference import dataset_meta_from_config
    from mmpose.registry import MODELS

    init_default_scope('mmpose')
    torch.manual_seed(0)
    cfg = Config.fromfile(str(TINY_POSE))
    model = MODELS.build(cfg.model)
    model.init_weights()
    meta = dataset_meta_from_config(cfg, dataset_mode='train')
    checkpoint = save_checkpoint(model, meta, tmp_path / 'tiny.pth')
    image = random_image(tmp_path / 'person.jpg', 96, 64)

    # det_model='whole_image': the whole image is the person box (no detector download)
    inferencer = MMPoseInferencer(
        pose2d=str(TINY_POSE), pose2d_weights=checkpoint, det_model='whole_image', device='cpu')
    out = tmp_path / 'out'
    result = next(inferencer(image, out_dir=str(out)))

    reference, = inference_topdown(init_model(str(TINY_POSE), checkpoint, device='cpu'), image)
    person, = result['predictions'][0]
    np.testing.assert_allclose(
        person['keypoints'], reference.pred_instances.keypoints[0], rtol=1e-5, atol=1e-4)
    assert person['bbox'][0] == [0.0, 0.0, 64.0, 96.0]
    vis, = (out / 'visualizations').iterdir()
    assert cv2.imread(str(vis)).shape == (96, 64, 3)
    pred, = (out / 'predictions').iterdir()
    saved, = json.loads(pred.read_text())
    np.testing.assert_allclose(saved['keypoints'], person['keypoints'])
