# The tiny DeepLabV3+ config with PSA_p, paper variant, in every residual block of every
# ResNet stage, as the full DeepLabV3+ configs.
_base_ = ['./deeplabv3plus_r18-tiny-d8_1xb4-100iter_tiny-cityscapes-64x128.py']
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='PSAResNetV1c',
        psa=dict(mode='parallel', variant='paper', stages=(True, True, True, True))))
