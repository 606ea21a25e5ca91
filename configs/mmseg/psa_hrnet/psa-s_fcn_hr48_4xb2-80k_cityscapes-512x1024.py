# HRNetV2-W48 + FCN head on Cityscapes: the stock mmseg config with the released placement and
# block: PSA_s (sequential), official variant, in the BasicBlocks of stages 2-4 (arXiv 2107.00782).
_base_ = ['mmseg::hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='PSAHRNet',
        psa=dict(mode='sequential', variant='official', stages=(False, True, True, True))))
