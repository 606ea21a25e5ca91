"""The tiny Cityscapes generator: the real folder layout, deterministic, learnable."""
import hashlib
import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmpsa.datasets.cityscapes_tiny import (IGNORE, USED_CLASSES, class_histogram,
                                            make_tiny_cityscapes, render_scene)

REPO = Path(__file__).resolve().parents[2]


def _label_path(root: Path, img: Path) -> Path:
    rel = img.relative_to(root / 'leftImg8bit')
    return root / 'gtFine' / rel.parent / rel.name.replace('_leftImg8bit.png',
                                                           '_gtFine_labelTrainIds.png')


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob('*.png')):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny_cs')
    return root, make_tiny_cityscapes(root, num_train=6, num_val=3, seed=0)


def test_layout_is_cityscapes(tiny):
    root, written = tiny
    assert {k: len(v) for k, v in written.items()} == {'train': 6, 'val': 3}
    for split, paths in written.items():
        for img in paths:
            rel = img.relative_to(root)
            assert rel.parts[:2] == ('leftImg8bit', split) and len(rel.parts) == 4
            city = rel.parts[2]
            assert rel.name.startswith(f'{city}_') and rel.name.endswith('_000019_leftImg8bit.png')
            image = cv2.imread(str(img))
            label = cv2.imread(str(_label_path(root, img)), cv2.IMREAD_UNCHANGED)
            assert image.shape == (128, 256, 3) and image.dtype == np.uint8
            assert label.shape == (128, 256) and label.dtype == np.uint8
            assert set(np.unique(label)) <= set(USED_CLASSES) | {IGNORE}


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path):
    root, _ = tiny
    make_tiny_cityscapes(tmp_path / 'a', num_train=6, num_val=3, seed=0)
    make_tiny_cityscapes(tmp_path / 'b', num_train=6, num_val=3, seed=1)
    assert _digest(tmp_path / 'a') == _digest(root)
    assert _digest(tmp_path / 'b') != _digest(root)


def test_structure_is_learnable_not_noise():
    rng = np.random.default_rng(0)
    scenes = [render_scene(np.random.default_rng([7, i])) for i in range(6)]
    labels = [lb for _, lb in scenes]
    hist = class_histogram(labels)
    assert all(hist.get(c, 0) > 0 for c in USED_CLASSES)  # every drawn class occurs
    # layouts vary between frames
    assert not np.array_equal(labels[0], labels[1])

    # a nearest-class-mean colour classifier, fitted on 3 frames, labels the other 3 well
    def pixels(items):
        img = np.concatenate([im.reshape(-1, 3) for im, _ in items]).astype(np.float32)
        lab = np.concatenate([lb.ravel() for _, lb in items])
        keep = lab != IGNORE
        return img[keep], lab[keep]

    x_fit, y_fit = pixels(scenes[:3])
    x_new, y_new = pixels(scenes[3:])
    classes = np.array(sorted(set(y_fit)))
    means = np.stack([x_fit[y_fit == c].mean(0) for c in classes])
    pred = classes[np.argmin(((x_new[:, None, :] - means[None])**2).sum(-1), axis=1)]
    assert (pred == y_new).mean() > 0.8
    # ... while shuffling the labels leaves nothing to learn
    assert (rng.permutation(pred) == y_new).mean() < 0.4


def test_mmseg_cityscapes_dataset_reads_it(tiny):
    from mmengine.registry import DefaultScope
    from mmseg.datasets import CityscapesDataset

    root, written = tiny
    with DefaultScope.overwrite_default_scope('mmseg'):  # the pipeline's registry
        ds = CityscapesDataset(
            data_root=str(root),
            data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations'),
                dict(type='PackSegInputs')
            ])
        sample = ds[0]
    assert len(ds) == len(written['val'])
    gt = sample['data_samples'].gt_sem_seg.data
    assert tuple(gt.shape) == (1, 128, 256)
    assert set(gt.unique().tolist()) <= set(USED_CLASSES) | {IGNORE}


def test_cli_writes_the_data_set(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'cs'
    monkeypatch.setattr(sys, 'argv', [
        'make_tiny_cityscapes.py',
        str(out), '--num-train', '2', '--num-val', '1', '--height', '64', '--width', '128'
    ])
    runpy.run_path(str(REPO / 'tools' / 'misc' / 'make_tiny_cityscapes.py'), run_name='__main__')
    assert len(list((out / 'leftImg8bit' / 'train').rglob('*.png'))) == 2
    assert len(list((out / 'gtFine' / 'val').rglob('*_gtFine_labelTrainIds.png'))) == 1
    assert 'train: 2 frames' in capsys.readouterr().out


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_train=0), 'num_train'),
    (dict(num_val=-1), 'num_val'),
    (dict(size=(16, 256)), 'size'),
])
def test_bad_arguments_name_the_field(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_tiny_cityscapes(tmp_path, **kwargs)
