"""The tiny COCO-keypoints generator: real COCO format, deterministic, learnable."""
import json
import os.path as osp
import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmpsa.datasets.coco_tiny import COCO_KEYPOINTS, COCO_SKELETON, joint_colour, make_tiny_coco

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny_coco')
    files = make_tiny_coco(str(root), num_train=12, num_val=6, seed=3)
    return root, files


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_layout_is_mmpose_coco(tiny):
    root, files = tiny
    assert files == {
        'train': str(root / 'annotations' / 'person_keypoints_train2017.json'),
        'val': str(root / 'annotations' / 'person_keypoints_val2017.json')
    }
    for split, count in (('train', 12), ('val', 6)):
        coco = _load(files[split])
        assert len(coco['images']) == count
        for img in coco['images']:
            path = root / f'{split}2017' / img['file_name']
            assert img['file_name'] == f"{img['id']:012d}.jpg"
            assert cv2.imread(str(path)).shape == (img['height'], img['width'], 3)


def test_annotations_are_coco_keypoints(tiny):
    _, files = tiny
    coco = _load(files['train'])
    (cat, ) = coco['categories']
    assert cat['name'] == 'person' and cat['id'] == 1
    assert cat['keypoints'] == list(COCO_KEYPOINTS) and len(cat['keypoints']) == 17
    assert cat['skeleton'] == [list(p) for p in COCO_SKELETON]
    assert min(min(p) for p in cat['skeleton']) == 1  # 1-based, as COCO
    sizes = {img['id']: (img['width'], img['height']) for img in coco['images']}
    ids = [ann['id'] for ann in coco['annotations']]
    assert len(set(ids)) == len(ids)
    flags = []
    for ann in coco['annotations']:
        w, h = sizes[ann['image_id']]
        kpts = np.array(ann['keypoints'], dtype=float).reshape(17, 3)
        vis = kpts[:, 2]
        flags += vis.tolist()
        assert set(vis) <= {0, 1, 2}
        assert ann['num_keypoints'] == int((vis > 0).sum()) > 0
        assert np.all(kpts[vis == 0, :2] == 0)
        x, y, bw, bh = ann['bbox']
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and bw > 0 and bh > 0
        assert 0 < ann['area'] <= bw * bh
        assert ann['iscrowd'] == 0 and ann['category_id'] == 1
        assert ann['segmentation'] and all(len(p) >= 6 for p in ann['segmentation'])
        labelled = kpts[vis > 0]
        # labelled keypoints lie in the person's box (up to marker/rounding slack)
        assert np.all(labelled[:, 0] >= x - 2) and np.all(labelled[:, 0] <= x + bw + 2)
        assert np.all(labelled[:, 1] >= y - 2) and np.all(labelled[:, 1] <= y + bh + 2)
    flags = np.array(flags)
    # visible, occluded and unlabelled keypoints all occur
    assert (flags == 2).mean() > 0.7 and (flags == 1).sum() > 0 and (flags == 0).sum() > 0
    per_image = np.bincount([a['image_id'] for a in coco['annotations']])
    assert per_image[per_image > 0].mean() >= 2  # several people per image


def test_visible_keypoints_carry_their_marker(tiny):
    """A visible body keypoint sits on a marker of its joint type's colour."""
    root, files = tiny
    coco = _load(files['train'])
    hits, total = 0, 0
    for ann in coco['annotations']:
        img = cv2.imread(str(root / 'train2017' / f"{ann['image_id']:012d}.jpg"))
        kpts = np.array(ann['keypoints'], dtype=float).reshape(17, 3)
        for k in range(5, 17):  # body joints; face markers are 1-2 px
            x, y, v = kpts[k]
            if v != 2:
                continue
            pixel = img[int(round(y)), int(round(x))].astype(int)
            total += 1
            hits += int(np.abs(pixel - joint_colour(COCO_KEYPOINTS[k])).max() < 70)
    assert total > 100 and hits / total > 0.9


def test_deterministic(tiny, tmp_path):
    root, files = tiny
    again = make_tiny_coco(str(tmp_path / 'a'), num_train=12, num_val=6, seed=3)
    other = make_tiny_coco(str(tmp_path / 'b'), num_train=12, num_val=6, seed=4)
    for split in ('train', 'val'):
        assert Path(again[split]).read_bytes() == Path(files[split]).read_bytes()
        assert Path(other[split]).read_bytes() != Path(files[split]).read_bytes()
    name = '000000000001.jpg'
    assert ((tmp_path / 'a' / 'train2017' / name).read_bytes() == (root / 'train2017' /
                                                                   name).read_bytes())


def test_ground_truth_scores_ap_one(tiny):
    """COCO keypoint evaluation (xtcocotools, as mmpose's CocoMetric) reads the files:
    the ground truth as predictions scores AP 1, jittered keypoints score less."""
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval
    _, files = tiny
    sigmas = np.array([
        .26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89
    ]) / 10.0
    gt = COCO(files['val'])

    def ap(jitter):
        rng = np.random.default_rng(0)
        results = []
        for ann in gt.dataset['annotations']:
            kpts = np.array(ann['keypoints'], dtype=float).reshape(17, 3)
            kpts[:, :2] += rng.normal(0, jitter, (17, 2))
            kpts[:, 2] = 1
            results.append(
                dict(
                    image_id=ann['image_id'],
                    category_id=1,
                    score=1.0,
                    keypoints=kpts.reshape(-1).tolist()))
        evaluator = COCOeval(gt, gt.loadRes(results), 'keypoints', sigmas, use_area=True)
        evaluator.params.useSegm = None
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return evaluator.stats[0]

    assert ap(0.0) == pytest.approx(1.0)
    assert ap(4.0) < 0.9


def test_mmpose_coco_dataset_reads_it(tiny):
    from mmpose.datasets import CocoDataset
    root, _ = tiny
    for split, test_mode in (('train', False), ('val', True)):
        dataset = CocoDataset(
            data_root=str(root),
            data_mode='topdown',
            ann_file=f'annotations/person_keypoints_{split}2017.json',
            data_prefix=dict(img=f'{split}2017/'),
            test_mode=test_mode,
            pipeline=[])
        coco = _load(osp.join(root, 'annotations', f'person_keypoints_{split}2017.json'))
        assert len(dataset) == len(coco['annotations'])
        info = dataset[0]
        assert info['keypoints'].shape == (1, 17, 2)
        assert osp.exists(info['img_path'])
        assert dataset.metainfo['dataset_name'] == 'coco'


def test_cli(tmp_path, monkeypatch):
    out = tmp_path / 'cli'
    monkeypatch.setattr(
        sys, 'argv',
        ['make_tiny_coco.py',
         str(out), '--num-train', '2', '--num-val', '1', '--seed', '3'])
    runpy.run_path(str(REPO / 'tools' / 'misc' / 'make_tiny_coco.py'), run_name='__main__')
    coco = _load(out / 'annotations' / 'person_keypoints_val2017.json')
    assert len(coco['images']) == 1 and coco['annotations']


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='splits'):
        make_tiny_coco(str(tmp_path), splits=['test'])
    with pytest.raises(ValueError, match='num_train'):
        make_tiny_coco(str(tmp_path), num_train=-1)
    with pytest.raises(ValueError, match='width'):
        make_tiny_coco(str(tmp_path), width=16)
