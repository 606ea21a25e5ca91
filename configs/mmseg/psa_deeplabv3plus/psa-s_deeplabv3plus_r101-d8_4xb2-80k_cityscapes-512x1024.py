# DeepLabV3+ R101-D8 on Cityscapes: the stock mmseg config with PSA_s (sequential, paper
# variant) in every residual block of every ResNet stage (our extension: the released code
# has PSA only in HRNet's BasicBlocks).
_base_ = ['mmseg::deeplabv3plus/deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='PSAResNetV1c',
        psa=dict(mode='sequential', variant='paper', stages=(True, True, True, True))))
