# Opt-in (our extension, not in the paper): the stock SimpleBaseline ResNet-50 config with a
# PSA_p on the deconvolved features before the final 1x1 conv (PSAHeatmapHead).
_base_ = [
    'mmpose::body_2d_keypoint/topdown_heatmap/coco/'
    'td-hm_res50_8xb64-210e_coco-256x192.py'
]
custom_imports = dict(imports=['mmpsa'], allow_failed_imports=False)

model = dict(head=dict(type='PSAHeatmapHead', psa=dict(mode='parallel', variant='paper')))
