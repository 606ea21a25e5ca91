# A narrow DeepLabV3+ (ResNet-18 V1c D8 with 16 base channels) for the built-in tiny
# Cityscapes-format data (python tools/misc/make_tiny_cityscapes.py data/tiny_cityscapes): trains
# to a clearly non-trivial mIoU in seconds on a CPU. Plain BN, no pretrained weights, no
# workers. Not a benchmark config: it exists for tests, smoke runs and the stock baseline of
# psa-p_deeplabv3plus_r18-tiny-d8.
# Model: mmseg's DeepLabV3+ model base at depth 18, narrowed; data and schedule: the shared
# tiny base.
_base_ = [
    'mmseg::_base_/models/deeplabv3plus_r50-d8.py',
    '../../_base_/tiny-cityscapes_1xb4-100iter-64x128.py'
]

norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN refuses CPU tensors
model = dict(
    data_preprocessor=dict(size=(64, 128)),
    pretrained=None,
    backbone=dict(depth=18, stem_channels=16, base_channels=16, norm_cfg=norm_cfg, init_cfg=None),
    decode_head=dict(
        in_channels=128,
        channels=32,
        c1_in_channels=16,
        c1_channels=8,
        dilations=(1, 2, 4, 6),
        norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, norm_cfg=norm_cfg))
