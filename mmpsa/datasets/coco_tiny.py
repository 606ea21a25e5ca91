"""A deterministic tiny COCO-keypoints dataset: articulated figures on textured ground.

Writes the layout mmpose's ``CocoDataset`` reads::

    <root>/annotations/person_keypoints_train2017.json
    <root>/annotations/person_keypoints_val2017.json
    <root>/train2017/000000000001.jpg ...
    <root>/val2017/000000100001.jpg ...

The annotations are real COCO format: one ``person`` category with the 17 COCO keypoint
names and the COCO skeleton (1-based), and per person ``keypoints`` as ``[x, y, v] * 17``
with COCO's visibility flags (0: not labelled, 1: labelled but occluded, 2: visible),
``num_keypoints``, ``bbox`` (xywh, the person's silhouette clipped to the image), ``area``
(the silhouette's pixel count), polygon ``segmentation`` and ``iscrowd``.

What a model can learn: each person is a stick figure seen from the front (its left side
on the image's right, as COCO's people who face the camera) with a torso, thick limbs that
join the keypoints, a head carrying nose, eyes and ears, and a small marker of one colour
per joint type at every keypoint (left and right share a colour, so horizontal flips stay
consistent). Persons may overlap, be cut by the image border (those keypoints get
``v=0``) or be hidden behind a rectangular occluder or another person (``v=1``); a head
turned aside hides its far ear (``v=0``). Every image is drawn from its own random
generator seeded by ``(seed, split, index)``: the same arguments give the same bytes.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ['COCO_KEYPOINTS', 'COCO_SKELETON', 'joint_colour', 'make_tiny_coco', 'render_image']

COCO_KEYPOINTS = ('nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder',
                  'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist',
                  'left_hip', 'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle')
# COCO's person skeleton, 1-based keypoint indices as in person_keypoints_*.json.
COCO_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
                 (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))

# One BGR marker colour per joint type; a left/right pair shares its colour.
_JOINT_COLOURS = {
    'nose': (0, 0, 255),
    'eye': (255, 0, 255),
    'ear': (0, 140, 255),
    'shoulder': (0, 255, 255),
    'elbow': (0, 255, 0),
    'wrist': (255, 255, 0),
    'hip': (255, 0, 0),
    'knee': (160, 0, 255),
    'ankle': (255, 255, 255)
}
_FACE = frozenset(range(5))
_SPLITS = {'train': 0, 'val': 1}
_OCCLUDER = 255  # owner id of occluder pixels
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_SCALE = 1 << _SHIFT


def joint_colour(name: str) -> Tuple[int, int, int]:
    """The BGR marker colour of a COCO keypoint name (``'left_wrist'`` -> wrist's)."""
    return _JOINT_COLOURS[name.split('_')[-1]]


def _fixed(pt: np.ndarray) -> Tuple[int, int]:
    """A point in cv2's fixed-point sub-pixel coordinates."""
    return int(round(pt[0] * _SCALE)), int(round(pt[1] * _SCALE))


def _unit(angle: float) -> np.ndarray:
    """Direction ``angle`` radians from straight down, turning towards +x."""
    return np.array([np.sin(angle), np.cos(angle)])


def _pose(rng: np.random.Generator, pelvis: np.ndarray,
          height: float) -> Tuple[np.ndarray, np.ndarray, float]:
    """Sample the 17 keypoints of a front-facing figure ``height`` pixels tall.

    Returns:
        (keypoints (17, 2), head centre (2,), head yaw in [-1, 1]).
    """
    h = height
    lean = rng.uniform(-0.2, 0.2)
    up = np.array([np.sin(lean), -np.cos(lean)])
    side = np.array([np.cos(lean), np.sin(lean)])  # towards the figure's left
    neck = pelvis + 0.30 * h * up
    head = neck + 0.10 * h * up
    yaw = rng.uniform(-1.0, 1.0)
    kpts = np.zeros((17, 2))
    kpts[0] = head + 0.03 * h * yaw * side - 0.01 * h * up
    for s, (eye, ear) in ((1, (1, 3)), (-1, (2, 4))):
        kpts[eye] = head + (0.025 * s + 0.03 * yaw) * h * side + 0.02 * h * up
        kpts[ear] = head + (0.062 * s + 0.01 * yaw) * h * side
    for s, (sho, elb, wri, hip, kne, ank) in ((1, (5, 7, 9, 11, 13, 15)), (-1, (6, 8, 10, 12, 14,
                                                                                16))):
        kpts[sho] = neck + 0.11 * h * s * side
        upper = rng.uniform(0.1, 2.6)
        fore = upper + rng.uniform(-2.2, 0.4)
        kpts[elb] = kpts[sho] + 0.16 * h * _unit(s * upper)
        kpts[wri] = kpts[elb] + 0.14 * h * _unit(s * fore)
        kpts[hip] = pelvis + 0.08 * h * s * side
        thigh = rng.uniform(-0.1, 0.5)
        shin = thigh + rng.uniform(-0.5, 0.3)
        kpts[kne] = kpts[hip] + 0.24 * h * _unit(s * thigh)
        kpts[ank] = kpts[kne] + 0.23 * h * _unit(s * shin)
    return kpts, head, yaw


def _draw_figure(canvases: Sequence[Tuple[np.ndarray, object]], kpts: np.ndarray, head: np.ndarray,
                 height: float, colours: Dict[str, tuple]) -> None:
    """Draw a figure's body (no markers) on each ``(canvas, colour-or-key)`` pair.

    A canvas paired with ``None`` is painted in ``colours`` (anti-aliased); one paired
    with a number gets that value wherever the figure is (masks, owner maps).
    """
    h = height
    neck = (kpts[5] + kpts[6]) / 2
    for canvas, fill in canvases:
        paint = colours if fill is None else dict.fromkeys(colours, fill)
        aa = cv2.LINE_AA if fill is None else cv2.LINE_8
        for chain in ((11, 13, 15), (12, 14, 16)):
            pts = np.array([_fixed(kpts[i]) for i in chain], np.int32)
            cv2.polylines(canvas, [pts], False, paint['legs'], max(1, int(0.07 * h)), aa, _SHIFT)
        torso = np.array([_fixed(kpts[i]) for i in (5, 6, 12, 11)], np.int32)
        cv2.fillPoly(canvas, [torso], paint['shirt'], aa, _SHIFT)
        cv2.polylines(canvas, [torso], True, paint['shirt'], max(1, int(0.04 * h)), aa, _SHIFT)
        cv2.line(canvas, _fixed(neck), _fixed(head), paint['skin'], max(1, int(0.04 * h)), aa,
                 _SHIFT)
        for chain in ((5, 7, 9), (6, 8, 10)):
            pts = np.array([_fixed(kpts[i]) for i in chain], np.int32)
            cv2.polylines(canvas, [pts], False, paint['shirt'], max(1, int(0.055 * h)), aa, _SHIFT)
        cv2.circle(canvas, _fixed(head), int(round(0.065 * h * _SCALE)), paint['skin'], -1, aa,
                   _SHIFT)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted texture: a smooth colour field, oriented stripes and grain."""
    base = rng.uniform(70, 190, 3)
    low = cv2.resize(
        rng.normal(0, 30, (4, 5, 3)).astype(np.float32), (width, height),
        interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    stripes = wave[..., None] * rng.uniform(5, 20, 3)
    grain = rng.normal(0, 5, (height, width, 3))
    return np.clip(base + low + stripes + grain, 0, 255).astype(np.uint8)


def _boxes_overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over the smaller of two xyxy boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / small


def render_image(rng: np.random.Generator,
                 width: int = 192,
                 height: int = 144,
                 num_persons: Tuple[int, int] = (2, 4),
                 person_height: Tuple[float, float] = (56.0, 110.0),
                 occluder_prob: float = 0.35) -> Tuple[np.ndarray, List[dict]]:
    """Draw one image and its persons' annotations (no ids yet).

    Args:
        rng: the image's own random generator.
        width: image width in pixels.
        height: image height in pixels.
        num_persons: inclusive range of persons per image.
        person_height: range of figure heights in pixels.
        occluder_prob: chance of one rectangular occluder over a person.

    Returns:
        (BGR uint8 image, list of annotation dicts without ``id``/``image_id``).
    """
    img = _background(rng, width, height)
    owner = np.zeros((height, width), np.uint8)
    figures = []  # (keypoints, head centre, yaw, height)
    boxes: List[Tuple[float, float, float, float]] = []
    want = int(rng.integers(num_persons[0], num_persons[1] + 1))
    for _ in range(12 * want):
        if len(figures) == want:
            break
        size = rng.uniform(*person_height)
        truncate = rng.random() < 0.15
        margin = -0.2 * size if truncate else 0.18 * size
        x = rng.uniform(margin, width - margin)
        y = rng.uniform(0.5 * size + (-0.3 * size if truncate else 0),
                        max(0.5 * size + 1, height - 0.47 * size + (0.3 * size if truncate else 0)))
        kpts, head, yaw = _pose(rng, np.array([x, y]), size)
        box = (kpts[:, 0].min(), kpts[:, 1].min(), kpts[:, 0].max(), kpts[:, 1].max())
        inside = ((kpts[:, 0] >= 0) & (kpts[:, 0] <= width - 1) & (kpts[:, 1] >= 0)
                  & (kpts[:, 1] <= height - 1))
        if inside.sum() < 6 or any(_boxes_overlap(box, b) > 0.35 for b in boxes):
            continue
        boxes.append(box)
        figures.append((kpts, head, yaw, size))

    annotations = []
    masks = []
    for pid, (kpts, head, yaw, size) in enumerate(figures, start=1):
        colours = dict(
            shirt=tuple(float(c) for c in rng.uniform(20, 235, 3)),
            legs=tuple(float(c) for c in rng.uniform(20, 235, 3)),
            skin=tuple(float(c) for c in rng.uniform([60, 90, 130], [150, 190, 240])))
        mask = np.zeros((height, width), np.uint8)
        _draw_figure([(img, None), (owner, pid), (mask, 1)], kpts, head, size, colours)
        hidden_ear = 3 if yaw > 0.5 else 4 if yaw < -0.5 else None  # far ear
        for k, name in enumerate(COCO_KEYPOINTS):
            if k == hidden_ear:
                continue
            radius = max(1.0, 0.012 * size) if k in _FACE else max(1.5, 0.022 * size)
            cv2.circle(img, _fixed(kpts[k]), int(round(radius * _SCALE)), joint_colour(name), -1,
                       cv2.LINE_AA, _SHIFT)
        masks.append((mask, hidden_ear))

    if figures and rng.random() < occluder_prob:
        kpts = figures[int(rng.integers(len(figures)))][0]
        cx, cy = kpts[int(rng.integers(17))]
        ow, oh = rng.uniform(8, 30, 2)
        x0, y0 = int(max(0, cx - ow / 2)), int(max(0, cy - oh / 2))
        x1, y1 = int(min(width, cx + ow / 2)), int(min(height, cy + oh / 2))
        if x1 > x0 and y1 > y0:
            patch = _background(rng, x1 - x0, y1 - y0)
            img[y0:y1, x0:x1] = patch // 2 + (rng.uniform(0, 127, 3)).astype(np.uint8)
            owner[y0:y1, x0:x1] = _OCCLUDER

    for pid, (figure, (mask, hidden_ear)) in enumerate(zip(figures, masks), start=1):
        kpts = figure[0]
        flat: List[float] = []
        for k in range(17):
            x, y = kpts[k]
            ix, iy = int(round(x)), int(round(y))
            if k == hidden_ear or not (0 <= ix < width and 0 <= iy < height):
                flat += [0.0, 0.0, 0]
                continue
            vis = 2 if owner[iy, ix] == pid else 1
            flat += [round(float(x), 2), round(float(y), 2), vis]
        ys, xs = np.nonzero(mask)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polygons = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
        annotations.append(
            dict(
                category_id=1,
                keypoints=flat,
                num_keypoints=int(sum(1 for v in flat[2::3] if v > 0)),
                bbox=[
                    float(xs.min()),
                    float(ys.min()),
                    float(xs.max() - xs.min() + 1),
                    float(ys.max() - ys.min() + 1)
                ],
                area=float(mask.sum()),
                iscrowd=0,
                segmentation=polygons))
    return img, annotations


def _split(root: str, split: str, num_images: int, seed: int, width: int, height: int) -> str:
    """Write one split's images and annotation file; return the file's path."""
    img_dir = osp.join(root, f'{split}2017')
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    first_id = 1 if split == 'train' else 100001
    for index in range(num_images):
        rng = np.random.default_rng([seed, _SPLITS[split], index])
        img, anns = render_image(rng, width, height)
        img_id = first_id + index
        file_name = f'{img_id:012d}.jpg'
        cv2.imwrite(osp.join(img_dir, file_name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append(dict(id=img_id, file_name=file_name, width=width, height=height, license=1))
        for ann in anns:
            annotations.append(
                dict(id=len(annotations) + 1 + first_id * 10, image_id=img_id, **ann))
    coco = dict(
        info=dict(
            description='mmpsa tiny COCO keypoints (synthetic figures)',
            version='1.0',
            year=2026,
            contributor='mmpsa',
            seed=seed),
        licenses=[dict(id=1, name='CC0 1.0', url='')],
        images=images,
        annotations=annotations,
        categories=[
            dict(
                supercategory='person',
                id=1,
                name='person',
                keypoints=list(COCO_KEYPOINTS),
                skeleton=[list(pair) for pair in COCO_SKELETON])
        ])
    ann_file = osp.join(root, 'annotations', f'person_keypoints_{split}2017.json')
    os.makedirs(osp.dirname(ann_file), exist_ok=True)
    with open(ann_file, 'w') as f:
        json.dump(coco, f)
    return ann_file


def make_tiny_coco(root: str,
                   num_train: int = 96,
                   num_val: int = 24,
                   seed: int = 0,
                   width: int = 192,
                   height: int = 144,
                   splits: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Write a tiny COCO-keypoints dataset under ``root`` (mmpose's CocoDataset layout).

    Args:
        root: output folder (created; existing files of the same names are replaced).
        num_train: number of training images.
        num_val: number of validation images.
        seed: dataset seed; equal arguments give byte-identical output.
        width: image width in pixels.
        height: image height in pixels.
        splits: which splits to write; default both ``('train', 'val')``.

    Returns:
        ``{split: annotation file path}``.
    """
    splits = tuple(splits) if splits is not None else ('train', 'val')
    for split in splits:
        if split not in _SPLITS:
            raise ValueError(f"splits must be among {tuple(_SPLITS)}, got {split!r}")
    counts = dict(train=num_train, val=num_val)
    for name, value in (('num_train', num_train), ('num_val', num_val), ('width', width), ('height',
                                                                                           height)):
        if not isinstance(value, int) or value < (0 if name.startswith('num') else 32):
            raise ValueError(f"{name} must be an int >= "
                             f"{0 if name.startswith('num') else 32}, got {value!r}")
    return {split: _split(root, split, counts[split], seed, width, height) for split in splits}
