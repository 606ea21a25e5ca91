# The Cityscapes table: each PSA config beside its stock twin (the stock mmseg config it
# inherits, same 80k schedule), tested on val (last checkpoint), and the two released networks.
# `python tools/reproduce.py cityscapes --launcher pytorch --gpus 4 \
#      --released psa_p=RELEASED_P.pth --released psa_s=RELEASED_S.pth` (see the README).
#
# Where the paper's numbers go (DeLightCMU/PSA README, its Table 5 = arXiv 2107.00782's): 86.95
# (PSA_p) and 86.72 (PSA_s) are the Cityscapes *val* mIoU of the released weights, i.e. of the
# hierarchical multi-scale HRNetV2-W48 + OCR network evaluated at scales 0.5, 1.0, 2.0, trained
# by the authors' recipe (Mapillary pre-training, RMI loss, 1024x2048 crops, 175 epochs, coarse
# boosting). So they sit on the `released` rows (no training here: the converter on the
# checkpoint you downloaded, then tools/test.py on val). The two 80k mscale training configs
# train that network in mmseg's schedule, not by that recipe: their paper column shows the value
# only as a labelled reference. The single-scale 80k rows have no paper value.
title = 'MMSegmentation, Cityscapes val'
task = 'Semantic Segmentation'
dataset = 'Cityscapes'

readme = 'https://github.com/DeLightCMU/PSA (README, Table 5 of arXiv 2107.00782)'
released_source = (f'{readme}: the released weights, evaluated by the released code at scales '
                   '0.5, 1.0, 2.0 of val')
defaults = dict(metric='mIoU', label='mIoU', scale=1.0, checkpoint='last')
ocr_stock = 'mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py'
fcn_stock = 'mmseg::hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py'
official = 'mmseg/psa_mscale_ocrnet/psa-{}_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py'
mscale_80k = 'mmseg/psa_mscale_ocrnet/psa-{}_mscale-ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py'
paper_p = dict(value=86.95, split='val', source=released_source)
paper_s = dict(value=86.72, split='val', source=released_source)
rows = [
    # the released weights: converted and tested, nothing trained
    dict(psa=official.format('p'), stock=None, released='psa_p', paper=paper_p),
    dict(psa=official.format('s'), stock=None, released='psa_s', paper=paper_s),
    # the released network in mmseg's 80k schedule (no stock twin: mmseg has no mscale config)
    dict(psa=mscale_80k.format('p'), stock=None, paper=dict(paper_p, reference='released recipe')),
    dict(psa=mscale_80k.format('s'), stock=None, paper=dict(paper_s, reference='released recipe')),
    # single-scale 80k configs beside their stock twins; no paper value
    dict(psa='mmseg/psa_ocrnet/psa-p_ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py', stock=ocr_stock),
    dict(psa='mmseg/psa_ocrnet/psa-s_ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py', stock=ocr_stock),
    dict(psa='mmseg/psa_hrnet/psa-p_fcn_hr48_4xb2-80k_cityscapes-512x1024.py', stock=fcn_stock),
    dict(psa='mmseg/psa_hrnet/psa-s_fcn_hr48_4xb2-80k_cityscapes-512x1024.py', stock=fcn_stock),
]
