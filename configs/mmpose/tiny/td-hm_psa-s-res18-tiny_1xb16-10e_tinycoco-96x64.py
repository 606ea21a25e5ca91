# A tiny PSA_s SimpleBaseline on the tiny synthetic COCO-keypoints set: the tiny HRNet
# config's data, codec and 96x64 input with a narrow ResNet-18 (stem and base width 16,
# PSA_s in every BasicBlock) and three 64-channel deconvs, trained for 10 epochs.
_base_ = ['./td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py']

max_epochs = 10
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', begin=0, end=10, start_factor=0.1, by_epoch=False),
    dict(type='CosineAnnealingLR', begin=0, end=max_epochs, eta_min=1e-4, by_epoch=True),
]

model = dict(
    backbone=dict(
        _delete_=True,
        type='PSAResNet',
        depth=18,
        stem_channels=16,
        base_channels=16,
        init_cfg=None,
        psa=dict(mode='sequential', variant='paper', stages=(True, True, True, True))),
    head=dict(in_channels=128, deconv_out_channels=(64, 64, 64), deconv_kernel_sizes=(4, 4, 4)))
