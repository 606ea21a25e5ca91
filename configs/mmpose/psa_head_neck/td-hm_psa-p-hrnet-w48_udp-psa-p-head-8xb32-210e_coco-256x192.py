# Opt-in (our extension): PSA_p in every residual block of the UDP HRNet-W48 backbone (the
# paper's placement) and, in addition, a PSA_p head (PSAHeatmapHead).
_base_ = ['../psa_hrnet/td-hm_psa-p-hrnet-w48_udp-8xb32-210e_coco-256x192.py']

model = dict(head=dict(type='PSAHeatmapHead', psa=dict(mode='parallel', variant='paper')))
