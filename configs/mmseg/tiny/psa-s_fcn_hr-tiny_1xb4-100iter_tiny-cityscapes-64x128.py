# The tiny HRNet + FCN config with the released placement and block of the full configs:
# PSA_s, official variant, in the BasicBlocks of stages 2-4.
_base_ = ['./fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py']
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='PSAHRNet',
        psa=dict(mode='sequential', variant='official', stages=(False, True, True, True))))
