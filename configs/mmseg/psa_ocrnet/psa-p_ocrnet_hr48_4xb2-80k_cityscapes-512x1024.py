# OCRNet with HRNetV2-W48 on Cityscapes: the stock mmseg config with the released placement and
# block: PSA_p (parallel), official variant, in the BasicBlocks of stages 2-4 -- the model of the
# paper's Cityscapes rows (arXiv 2107.00782), trained with mmseg's 80k schedule.
_base_ = ['mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='PSAHRNet',
        psa=dict(mode='parallel', variant='official', stages=(False, True, True, True))))
