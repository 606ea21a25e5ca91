# Opt-in (our extension): psa-p_ocrnet_hr48 plus a PSA_p (parallel) block in the OCR head, on the
# pixel features entering the object-context block.
_base_ = ['./psa-p_ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py']

norm_cfg = dict(type='SyncBN', requires_grad=True)
# decode_head is a list, which mmengine replaces whole on inheritance: this restates the stock
# one (mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py); the one change is the
# second head's type='PSAOCRHead' with psa=dict(...).
model = dict(decode_head=[
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
        type='PSAOCRHead',
        psa=dict(mode='parallel', variant='official'),
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
])
