# Train the released PSA_s network (psa-s_mscale-ocrnet_hr48_official) in mmseg's OCRNet schedule
# (80k iterations, 4x2 512x1024 crops, ImageNet-pretrained HRNet-W48, cross-entropy) with the
# released two-scale training: the network runs on the crop at scales 0.5 and 1.0, the two
# predictions are joined with the 0.5 scale's attention, and the losses (OCR 1.0, aux 0.4) are on
# the joined predictions. Validation is the released 3-scale evaluation.
# This is NOT the released recipe, which also had: RMI loss, per-scale supervision 0.05
# (train_cfg.scale_loss_weight here), 1024x2048 crops, Mapillary pre-training, Dropout 0.05
# before scale_attn, 175 epochs and coarse-annotation boosting. Expect lower numbers than the
# paper's; none have been measured.
_base_ = ['./psa-s_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py']

model = dict(strict_load=False, train_cfg=dict(scales=[0.5, 1.0], scale_loss_weight=0.0))
