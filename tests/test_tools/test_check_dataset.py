"""tools/misc/check_dataset.py finds, per file and annotation id, the bad data that the stock
libraries either fail on without naming a file or train on silently (issue 19 §4); and
tools/train.py stops on it before training."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmpsa.datasets.cityscapes_tiny import make_tiny_cityscapes
from mmpsa.datasets.coco_tiny import make_tiny_coco

REPO = Path(__file__).resolve().parents[2]
SEG = REPO / 'configs/mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
POSE = REPO / 'configs/mmpose/tiny/td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py'

pytestmark = pytest.mark.usefixtures('cpu_without_yapf')


def _seg_cfg(tmp_path: Path, data_root: Path) -> str:
    path = tmp_path / f'seg_{data_root.name}.py'
    path.write_text(f'_base_ = [{str(SEG)!r}]\n'
                    f'train_dataloader = dict(dataset=dict(data_root={f"{data_root}/"!r}))\n')
    return str(path)


def _pose_cfg(tmp_path: Path, data_root: Path) -> str:
    path = tmp_path / f'pose_{data_root.name}.py'
    path.write_text(f'_base_ = [{str(POSE)!r}]\n'
                    f'train_dataloader = dict(dataset=dict(data_root={f"{data_root}/"!r}))\n')
    return str(path)


def _run(load_tool, capsys, argv):
    status = load_tool('misc/check_dataset').main(argv)
    return status, capsys.readouterr().out


def test_clean_tiny_data_passes(tmp_path, load_tool, capsys):
    make_tiny_cityscapes(tmp_path / 'city', num_train=2, num_val=1, size=(32, 64))
    status, out = _run(load_tool, capsys, [_seg_cfg(tmp_path, tmp_path / 'city')])
    assert status == 0 and '2 samples, 2 checked: no problems found' in out


def test_bad_segmentation_data_is_named(tmp_path, load_tool, capsys):
    written = make_tiny_cityscapes(tmp_path / 'city', num_train=4, num_val=1, size=(32, 64))
    images = written['train']
    labels = [
        Path(
            str(p).replace('leftImg8bit', 'gtFine', 1).replace('_leftImg8bit.png',
                                                               '_gtFine_labelTrainIds.png'))
        for p in images
    ]
    label = cv2.imread(str(labels[0]), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 30  # >= 19 classes, not the ignore index 255
    cv2.imwrite(str(labels[0]), label)
    cv2.imwrite(str(labels[1]), np.zeros((16, 64), np.uint8))  # another size than its image
    images[2].write_bytes(b'not a png')
    status, out = _run(load_tool, capsys, [_seg_cfg(tmp_path, tmp_path / 'city')])
    assert status == 1
    assert f'{labels[0]}: label values outside the classes: [30]' in out
    assert f'{labels[1]}: label map size differs from its image: 16x64' in out
    assert f'{images[2]}: unreadable image' in out
    assert '3 problems' in out


def test_empty_split_is_named_and_stops_training(tmp_path, load_tool, capsys):
    for folder in ('leftImg8bit/train', 'gtFine/train'):
        (tmp_path / 'empty' / folder).mkdir(parents=True)
    cfg = _seg_cfg(tmp_path, tmp_path / 'empty')
    status, out = _run(load_tool, capsys, [cfg])
    assert status == 1 and 'empty split' in out and str(tmp_path / 'empty') in out
    with pytest.raises(SystemExit) as exit_info:
        load_tool('train').main([cfg, '--work-dir', str(tmp_path / 'w')])
    assert 'empty split' in str(exit_info.value.code)


def _coco(tmp_path: Path, name: str, edit) -> Path:
    root = tmp_path / name
    make_tiny_coco(str(root), num_train=2, num_val=1, splits=('train', ))
    ann_file = root / 'annotations' / 'person_keypoints_train2017.json'
    coco = json.loads(ann_file.read_text())
    edit(coco['annotations'], coco['images'])
    ann_file.write_text(json.dumps(coco))
    return root


def test_malformed_keypoints_are_named(tmp_path, load_tool, capsys):

    def edit(anns, images):
        anns[0]['keypoints'] = anns[0]['keypoints'][:50]

    root = _coco(tmp_path, 'coco_short', edit)
    status, out = _run(load_tool, capsys, [_pose_cfg(tmp_path, root)])
    assert status == 1
    assert 'person_keypoints_train2017.json annotation id' in out
    assert 'malformed keypoints: 50 entries, expected 51 numbers' in out


def test_bad_visibility_and_far_keypoints_are_named(tmp_path, load_tool, capsys):
    ids = {}

    def edit(anns, images):
        labelled = [a for a in anns if any(a['keypoints'][2::3])]
        first, second = labelled[0], labelled[-1]
        ids.update(vis=first['id'], far=second['id'])
        first['keypoints'][2] = 7  # nose visibility
        k = next(k for k in range(17) if second['keypoints'][3 * k + 2] > 0)
        second['keypoints'][3 * k] = 10_000.0
        ids['k'] = k

    root = _coco(tmp_path, 'coco_flags', edit)
    status, out = _run(load_tool, capsys, [_pose_cfg(tmp_path, root)])
    assert status == 1
    assert f"annotation id {ids['vis']}" in out
    assert 'bad visibility flag: keypoint 0 (nose): 7, expected 0, 1 or 2' in out
    assert f"annotation id {ids['far']}" in out
    assert f"keypoint outside its image: keypoint {ids['k']}" in out


def _bad_keypoints(tmp_path: Path, name: str) -> tuple:
    """A tiny COCO set with visibility 7 and x=10000 (the issue-26 case), and their ids."""
    ids = {}

    def edit(anns, images):
        labelled = [a for a in anns if any(a['keypoints'][2::3])]
        labelled[0]['keypoints'][2] = 7
        k = next(k for k in range(17) if labelled[-1]['keypoints'][3 * k + 2] > 0)
        labelled[-1]['keypoints'][3 * k] = 10_000.0
        ids.update(vis=labelled[0]['id'], far=labelled[-1]['id'])

    return _coco(tmp_path, name, edit), ids


WRAPPERS = {
    'RepeatDataset':
    ("dict(type='RepeatDataset', times=3, dataset=INNER)", 'train_dataloader.dataset.dataset'),
    'ClassBalancedDataset': ("dict(type='ClassBalancedDataset', oversample_thr=0.1, "
                             'dataset=INNER)', 'train_dataloader.dataset.dataset'),
    'ConcatDataset':
    ("dict(type='ConcatDataset', datasets=[GOOD, INNER])", 'train_dataloader.dataset.datasets[1]'),
    'CombinedDataset': ("dict(type='CombinedDataset', metainfo=dict(from_file="
                        "'configs/_base_/datasets/coco.py'), datasets=[GOOD, INNER], "
                        'pipeline=[])', 'train_dataloader.dataset.datasets[1]'),
    'MultiImageMixDataset': ("dict(type='MultiImageMixDataset', dataset=INNER, pipeline=[])",
                             'train_dataloader.dataset.dataset'),
}


@pytest.mark.parametrize('wrapper', sorted(WRAPPERS))
def test_bad_keypoints_are_found_inside_each_wrapper(tmp_path, load_tool, capsys, wrapper):
    """Issue 26 item 6: a wrapped dataset was passed as "no problems found"."""
    bad, ids = _bad_keypoints(tmp_path, 'coco_bad')
    good = tmp_path / 'coco_good'
    make_tiny_coco(str(good), num_train=2, num_val=1, splits=('train', ))
    text, path = WRAPPERS[wrapper]
    from mmengine.config import Config
    base = Config.fromfile(str(POSE)).train_dataloader.dataset.to_dict()
    inner, outer = dict(base, data_root=f'{bad}/'), dict(base, data_root=f'{good}/')
    wrapped = eval(text, dict(INNER=inner, GOOD=outer, dict=dict))  # our own literal
    wrapped['_delete_'] = True  # replace the base's dataset, not merge into it
    config = tmp_path / f'{wrapper}.py'
    config.write_text(f'_base_ = [{str(POSE)!r}]\n'
                      f'train_dataloader = dict(dataset={wrapped!r})\n')
    status, out = _run(load_tool, capsys, [str(config)])
    assert status == 1, out
    assert 'no problems found' not in out
    assert f"{path} (CocoDataset): " in out and f"annotation id {ids['vis']}" in out
    assert 'bad visibility flag' in out and 'keypoint outside its image' in out
