"""A tiny, deterministic street-scene data set in the real Cityscapes layout.

It exists so that the seg configs can be trained, validated, resumed and tested end to end
on a CPU in seconds. Files are written exactly where mmseg's ``CityscapesDataset`` looks::

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq>_000019_gtFine_labelTrainIds.png

The labels are Cityscapes train ids (0..18, 255 = ignore). Each image is a synthetic street
scene — sky, buildings with windows, trees, a perspective road with lane marks, sidewalks,
poles with signs, people and cars — drawn from a per-image random layout; every class has its
own colour and texture, so a small network learns it quickly, while shapes, positions and
sizes vary from image to image. The same ``seed`` always yields the same bytes.
"""
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np

#: Cityscapes train ids of the classes drawn (the other ten of the 19 never appear).
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
IGNORE = 255
USED_CLASSES: Tuple[int, ...] = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR)

# class -> (base RGB colour, texture noise amplitude)
_STYLE: Dict[int, Tuple[Tuple[int, int, int], float]] = {
    ROAD: ((96, 92, 100), 6.0),
    SIDEWALK: ((196, 150, 170), 8.0),
    BUILDING: ((150, 112, 78), 10.0),
    POLE: ((160, 160, 160), 4.0),
    SIGN: ((225, 205, 20), 6.0),
    VEGETATION: ((62, 138, 48), 22.0),
    SKY: ((110, 170, 225), 3.0),
    PERSON: ((215, 40, 70), 10.0),
    CAR: ((20, 30, 150), 8.0),
}

_CITIES = {'train': ('aachen', 'bremen'), 'val': ('frankfurt', 'lindau')}
_SPLIT_CODE = {'train': 0, 'val': 1}


def _paint(img: np.ndarray, label: np.ndarray, mask: np.ndarray, cls: int,
           rng: np.random.Generator) -> None:
    """Fill ``mask`` with the colour and noise texture of ``cls`` and label it."""
    colour, amp = _STYLE[cls]
    tint = rng.uniform(-12, 12, size=3)  # per-object shade
    noise = rng.normal(0.0, amp, size=(int(mask.sum()), 1))
    img[mask] = np.asarray(colour, np.float32) + tint + noise
    label[mask] = cls


def _rect(shape: Tuple[int, int], y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """Boolean mask of the axis-aligned box [y0, y1) x [x0, x1), clipped to the image."""
    h, w = shape
    mask = np.zeros(shape, bool)
    mask[max(int(y0), 0):min(int(y1), h), max(int(x0), 0):min(int(x1), w)] = True
    return mask


def render_scene(
    rng: np.random.Generator, size: Tuple[int, int] = (128, 256)) -> Tuple[np.ndarray, np.ndarray]:
    """Draw one street scene.

    Args:
        rng: The random generator that decides the layout.
        size: ``(height, width)`` of the image.

    Returns:
        An RGB ``uint8`` image (H, W, 3) and its train-id ``uint8`` label map (H, W).
    """
    h, w = size
    if h < 32 or w < 32:
        raise ValueError(f'size must be at least 32x32, got {size!r}')
    img = np.zeros((h, w, 3), np.float32)
    label = np.full((h, w), IGNORE, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]

    horizon = int(h * rng.uniform(0.38, 0.5))
    _paint(img, label, yy < horizon, SKY, rng)
    img[yy < horizon] += ((yy[yy < horizon] / horizon) * 25.0)[:, None]  # brighter downwards

    # Facades and trees along the horizon, down to the ground line.
    ground = horizon + int(h * 0.04)
    x = 0
    while x < w:
        bw = int(w * rng.uniform(0.12, 0.3))
        top = int(h * rng.uniform(0.05, 0.32))
        block = _rect((h, w), top, ground, x, x + bw)
        if rng.random() < 0.3:
            # a tree: a blotchy crown over a hedge that fills the block below the horizon
            cy, cx = (top + ground) / 2, x + bw / 2
            ry, rx = (ground - top) / 2, bw / 2
            crown = ((yy - cy) / ry)**2 + ((xx - cx) / rx)**2 < 1.0
            _paint(img, label, block & (crown | (yy >= horizon)), VEGETATION, rng)
        else:
            _paint(img, label, block, BUILDING, rng)
            # a window grid: darker cells, still labelled building
            windows = block & (((yy - top) % 7) >= 3) & (((xx - x) % 6) >= 3)
            img[windows] *= 0.55
        x += bw

    # Perspective road between the sidewalks, widening towards the bottom.
    vanish = w * rng.uniform(0.35, 0.65)
    half_bottom = w * rng.uniform(0.45, 0.7)
    t = np.clip((yy - ground) / max(h - ground, 1), 0.0, 1.0)
    half = 0.06 * w + t * half_bottom
    below = yy >= ground
    road = below & (np.abs(xx - vanish) < half)
    _paint(img, label, below & ~road, SIDEWALK, rng)
    # sidewalk tiles: a darker grid, still sidewalk
    img[below & ~road & ((yy % 8 == 0) | (xx % 12 == 0))] *= 0.8
    _paint(img, label, road, ROAD, rng)
    marks = road & (np.abs(xx - vanish) < 1 + 2 * t) & ((yy // 6) % 2 == 0)
    img[marks] = 235.0  # lane marks are road in Cityscapes

    # Poles (some with a sign) on the sidewalks.
    for _ in range(int(rng.integers(1, 4))):
        side = rng.choice([-1.0, 1.0])
        foot_y = int(rng.uniform(ground + 4, h - 4))
        tt = (foot_y - ground) / max(h - ground, 1)
        foot_x = vanish + side * (0.06 * w + tt * half_bottom + rng.uniform(3, 12))
        if not 2 <= foot_x < w - 2:
            continue
        top = int(h * rng.uniform(0.1, 0.3))
        pole = _rect((h, w), top, foot_y, foot_x - 1, foot_x + 2)
        _paint(img, label, pole, POLE, rng)
        if rng.random() < 0.7:
            s = int(rng.integers(6, 11))
            _paint(img, label, _rect((h, w), top, top + s, foot_x - s // 2, foot_x + s - s // 2),
                   SIGN, rng)

    # People on the sidewalks: an ellipse body and a round head.
    for _ in range(int(rng.integers(1, 4))):
        ph = h * rng.uniform(0.2, 0.34)
        fy = rng.uniform(ground + ph * 0.6, h)
        side = rng.choice([-1.0, 1.0])
        tt = (fy - ground) / max(h - ground, 1)
        fx = vanish + side * (0.06 * w + tt * half_bottom + rng.uniform(4, 20))
        body = (((yy - (fy - ph * 0.4)) / (ph * 0.4))**2 + ((xx - fx) / (ph * 0.14))**2) < 1.0
        head = ((yy - (fy - ph * 0.88))**2 + (xx - fx)**2) < (ph * 0.1)**2
        _paint(img, label, body | head, PERSON, rng)

    # Cars on the road: a body, a dark window strip, two dark wheels.
    for _ in range(int(rng.integers(1, 4))):
        by = rng.uniform(ground + 6, h - 2)
        tt = (by - ground) / max(h - ground, 1)
        cw = w * (0.08 + 0.2 * tt) * rng.uniform(0.8, 1.2)
        ch = cw * rng.uniform(0.45, 0.6)
        cx = vanish + rng.uniform(-1.0, 1.0) * (0.06 * w + tt * half_bottom) * 0.8
        car = _rect((h, w), by - ch, by, cx - cw / 2, cx + cw / 2)
        _paint(img, label, car, CAR, rng)
        img[car & (yy < by - ch * 0.6) & (np.abs(xx - cx) < cw * 0.35)] *= 0.45
        for wx in (cx - cw * 0.3, cx + cw * 0.3):
            wheel = ((yy - by)**2 + (xx - wx)**2) < (ch * 0.22)**2
            img[wheel & car] = 25.0

    # Half the frames show the ego vehicle's bonnet, which Cityscapes ignores.
    if rng.random() < 0.5:
        ego = yy >= h - int(h * rng.uniform(0.05, 0.1))
        img[ego] = (30.0, 30.0, 34.0)
        label[ego] = IGNORE

    img *= rng.uniform(0.85, 1.15)  # exposure
    img += rng.normal(0.0, 3.0, size=img.shape)  # sensor noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def make_tiny_cityscapes(root: Union[str, Path],
                         num_train: int = 12,
                         num_val: int = 4,
                         size: Tuple[int, int] = (128, 256),
                         seed: int = 0) -> Dict[str, List[Path]]:
    """Write the tiny data set under ``root`` in the Cityscapes folder layout.

    Args:
        root: The data root (what ``data_root`` names in a config).
        num_train: Number of training frames.
        num_val: Number of validation frames (also the test split of the configs).
        size: ``(height, width)`` of every frame.
        seed: Decides every layout; the same seed writes the same bytes.

    Returns:
        ``{'train': [...], 'val': [...]}``: the written image paths, per split.
    """
    for name, value in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')
    root = Path(root)
    written: Dict[str, List[Path]] = {}
    for split, count in (('train', num_train), ('val', num_val)):
        written[split] = []
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
            img, label = render_scene(rng, tuple(size))
            city = _CITIES[split][i % len(_CITIES[split])]
            stem = f'{city}_{i:06d}_000019'
            img_path = root / 'leftImg8bit' / split / city / f'{stem}_leftImg8bit.png'
            seg_path = root / 'gtFine' / split / city / f'{stem}_gtFine_labelTrainIds.png'
            img_path.parent.mkdir(parents=True, exist_ok=True)
            seg_path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(img_path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
                raise OSError(f'could not write {img_path}')
            if not cv2.imwrite(str(seg_path), label):
                raise OSError(f'could not write {seg_path}')
            written[split].append(img_path)
    return written


def class_histogram(labels: Sequence[np.ndarray]) -> Dict[int, int]:
    """Pixel count per train id over ``labels`` (ignore included), for summaries and tests."""
    ids, counts = np.unique(np.concatenate([np.ravel(lb) for lb in labels]), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}
