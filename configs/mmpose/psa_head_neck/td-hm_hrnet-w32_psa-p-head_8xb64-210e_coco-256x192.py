# Opt-in (our extension, not in the paper): the stock HRNet-W32 top-down config with a PSA_p
# on the head's features before the final 1x1 conv (PSAHeatmapHead); stock backbone.
_base_ = [
    'mmpose::body_2d_keypoint/topdown_heatmap/coco/'
    'td-hm_hrnet-w32_8xb64-210e_coco-256x192.py'
]
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(head=dict(type='PSAHeatmapHead', psa=dict(mode='parallel', variant='paper')))
