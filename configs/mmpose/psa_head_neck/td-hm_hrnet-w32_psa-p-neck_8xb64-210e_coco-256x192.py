# Opt-in (our extension, not in the paper): the stock HRNet-W32 top-down config with a PSA_p
# neck on the backbone's one output level (32 channels, 1/4 resolution); stock backbone.
_base_ = [
    'mmpose::body_2d_keypoint/topdown_heatmap/coco/'
    'td-hm_hrnet-w32_8xb64-210e_coco-256x192.py'
]
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(
    neck=dict(type='PSANeck', in_channels=[32], psa=dict(mode='parallel', variant='paper')))
