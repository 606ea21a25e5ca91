# HRNet-W48, top-down heatmaps on COCO: the stock mmpose config with PSA_s (sequential,
# paper variant) in every residual block of every stage (arXiv 2107.00782).
_base_ = [
    'mmpose::body_2d_keypoint/topdown_heatmap/coco/'
    'td-hm_hrnet-w48_8xb32-210e_coco-384x288.py'
]
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='PSAHRNet',
        psa=dict(mode='sequential', variant='paper', stages=(True, True, True, True))))
