# A tiny PSA_p HRNet on the tiny synthetic COCO-keypoints set: the tiny stock HRNet config with
# the full PSA HRNet configs' change, PSA_p (paper variant) in every residual block of every stage.
_base_ = ['./td-hm_hrnet-tiny_1xb16-5e_tinycoco-96x64.py']
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='PSAHRNet',
        psa=dict(mode='parallel', variant='paper', stages=(True, True, True, True))))
