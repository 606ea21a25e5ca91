# The COCO table: the paper's COCO keypoint rows mmpsa has configs for (UDP HRNet-W48 with PSA
# in every residual block), each beside its stock twin (the stock mmpose config it inherits,
# same 210-epoch schedule). Last checkpoint tested on val2017 with the person detections the
# stock config names. `python tools/reproduce.py coco --launcher pytorch --gpus 8`.
title = 'MMPose, COCO val2017 keypoints, top-down heatmaps, 210 epochs'
task = 'Body 2D Keypoint'
dataset = 'COCO'

# The paper's numbers: the DeLightCMU/PSA README (its Table 4 = arXiv 2107.00782's) gives
# UDP-HRNet-W48 + PSA 78.9 (PSA_p, 256x192), 79.5 (PSA_p, 384x288), 79.4 (PSA_s, 384x288) AP
# without saying val2017 or test-dev (paperswithcode lists 79.5 as test-dev AP): the split is
# not known, and the table says so. No weights were released.
readme = 'https://github.com/DeLightCMU/PSA (README, Table 4 of arXiv 2107.00782)'
unknown = 'split not stated by the source'
defaults = dict(metric='coco/AP', label='AP', scale=100.0, checkpoint='last')
udp = 'mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_hrnet-w48_udp-8xb32-210e_coco-'
rows = [
    dict(
        psa='mmpose/psa_hrnet/td-hm_psa-p-hrnet-w48_udp-8xb32-210e_coco-256x192.py',
        stock=udp + '256x192.py',
        paper=dict(value=78.9, split=unknown, source=readme)),
    dict(
        psa='mmpose/psa_hrnet/td-hm_psa-s-hrnet-w48_udp-8xb32-210e_coco-256x192.py',
        stock=udp + '256x192.py'),
    dict(
        psa='mmpose/psa_hrnet/td-hm_psa-p-hrnet-w48_udp-8xb32-210e_coco-384x288.py',
        stock=udp + '384x288.py',
        paper=dict(value=79.5, split=unknown, source=readme)),
    dict(
        psa='mmpose/psa_hrnet/td-hm_psa-s-hrnet-w48_udp-8xb32-210e_coco-384x288.py',
        stock=udp + '384x288.py',
        paper=dict(value=79.4, split=unknown, source=readme)),
]
