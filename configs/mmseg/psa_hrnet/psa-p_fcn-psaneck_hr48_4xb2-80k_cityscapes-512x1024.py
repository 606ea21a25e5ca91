# Opt-in (our extension): psa-p_fcn_hr48 plus a PSANeck, one PSA_p (official variant) on each
# of the four HRNet outputs, between the backbone and the stock FCN head.
_base_ = ['./psa-p_fcn_hr48_4xb2-80k_cityscapes-512x1024.py']

model = dict(
    neck=dict(
        type='PSANeck',
        in_channels=[48, 96, 192, 384],
        psa=dict(mode='parallel', variant='official')))
