# Opt-in (our extension): psa-s_deeplabv3plus_r50-d8 plus a PSA_s (sequential) block in the
# decode head, on the fused ASPP features.
_base_ = ['./psa-s_deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py']

model = dict(decode_head=dict(type='PSASepASPPHead', psa=dict(mode='sequential', variant='paper')))
