# A narrow HRNet (HR18s-like: one block per branch, widths 8-64) + FCN head, for the built-in
# tiny Cityscapes-format data (python tools/misc/make_tiny_cityscapes.py data/tiny_cityscapes):
# trains to a clearly non-trivial mIoU in seconds on a CPU. Plain BN, no pretrained weights,
# no workers. Not a benchmark config: it exists for tests, smoke runs and the stock baseline
# of psa-p_fcn_hr-tiny.
# Model: mmseg's HRNet-W18 FCN model base, narrowed; data and schedule: the shared tiny base.
_base_ = ['mmseg::_base_/models/fcn_hr18.py', '../../_base_/tiny-cityscapes_1xb4-100iter-64x128.py']

norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN refuses CPU tensors
model = dict(
    data_preprocessor=dict(size=(64, 128)),
    pretrained=None,
    backbone=dict(
        norm_cfg=norm_cfg,
        init_cfg=None,
        extra=dict(
            stage1=dict(num_blocks=(1, ), num_channels=(16, )),
            stage2=dict(num_blocks=(1, 1), num_channels=(8, 16)),
            stage3=dict(num_modules=1, num_blocks=(1, 1, 1), num_channels=(8, 16, 32)),
            stage4=dict(num_modules=1, num_blocks=(1, 1, 1, 1), num_channels=(8, 16, 32, 64)))),
    decode_head=dict(in_channels=[8, 16, 32, 64], channels=120, norm_cfg=norm_cfg))
