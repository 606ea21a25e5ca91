# HRNetV2-W48 + OCR + hierarchical multi-scale attention (arXiv 2005.10821) with PSA_p in the
# BasicBlocks of stages 2-4: the network of the released PSA_p Cityscapes checkpoint
# (DeLightCMU/PSA ocrnet.HRNet_Mscale; 86.95 val mIoU in the paper) and its evaluation: scales
# 0.5, 1.0 and 2.0 of the whole 1024x2048 image (the stock test pipeline), no flip, mmseg's
# default normalization (the released one). Not "stock + one PSA line": the segmentor, the OCR
# head (+ scale_attn) and test_cfg.scales change too. For converted checkpoints:
#   python tools/model_converters/psa_official_to_mmseg.py RELEASED.pth CONVERTED.pth
#   python tools/test.py configs/mmseg/psa_mscale_ocrnet/<this file> CONVERTED.pth
# Two differences from the released network, neither visible in the outputs on Cityscapes:
# - the released aux-head 1x1 conv and OCR 3x3 conv have a bias; the converter folds it into the
#   running mean of the BN that follows (exact), so the heads here are mmseg's stock ones;
# - mmseg's HRNet fuse layers upsample by a scale factor and then resize, the released ones
#   resize once: bitwise equal when H and W are multiples of 32 (Cityscapes at 0.5/1/2 is),
#   slightly different otherwise.
# strict_load=True: a checkpoint whose keys or shapes do not fit (e.g. the PSA_s one) fails at
# load time, naming them, where mmengine's Runner would load it non-strictly.
_base_ = ['mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
# decode_head is a list, which mmengine replaces whole on inheritance: this restates the stock
# one; the change is the second head's type='MscaleOCRHead' with attn_channels=256.
model = dict(
    type='MscaleCascadeEncoderDecoder',
    strict_load=True,
    backbone=dict(
        type='PSAHRNet',
        psa=dict(mode='parallel', variant='official', stages=(False, True, True, True))),
    decode_head=[
        dict(
            type='FCNHead',
            in_channels=[48, 96, 192, 384],
            channels=sum([48, 96, 192, 384]),
            input_transform='resize_concat',
            in_index=(0, 1, 2, 3),
            kernel_size=1,
            num_convs=1,
            norm_cfg=norm_cfg,
            concat_input=False,
            dropout_ratio=-1,
            num_classes=19,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
        dict(
            type='MscaleOCRHead',
            attn_channels=256,
            in_channels=[48, 96, 192, 384],
            channels=512,
            ocr_channels=256,
            input_transform='resize_concat',
            in_index=(0, 1, 2, 3),
            norm_cfg=norm_cfg,
            dropout_ratio=-1,
            num_classes=19,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    ],
    test_cfg=dict(mode='whole', scales=[0.5, 1.0, 2.0]))
