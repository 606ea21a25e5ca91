# Opt-in (our extension): psa-p_fcn_hr48 plus a PSA_p (parallel) block in the FCN head, on the
# concatenated HRNet features (720 channels).
_base_ = ['./psa-p_fcn_hr48_4xb2-80k_cityscapes-512x1024.py']

model = dict(decode_head=dict(type='PSAFCNHead', psa=dict(mode='parallel', variant='official')))
