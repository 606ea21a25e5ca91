# The Cityscapes table: the paper's Cityscapes rows mmpsa has configs for, each beside its stock
# twin (the stock mmseg config it inherits, same 80k schedule). Last checkpoint tested on val.
# `python tools/reproduce.py cityscapes --launcher pytorch --gpus 4` (see the README).
# The paper's numbers come from its own pipeline (Mapillary pre-training, multi-scale test,
# released MscaleOCR network), not from these configs' 80k single-scale schedule.
title = 'MMSegmentation, Cityscapes val, 512x1024 crops, 80k iterations'
task = 'Semantic Segmentation'
dataset = 'Cityscapes'

paper_source = 'arXiv 2107.00782 and the DeLightCMU/PSA README (its own pipeline)'
defaults = dict(metric='mIoU', label='mIoU', scale=1.0, checkpoint='last')
ocr_stock = 'mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py'
fcn_stock = 'mmseg::hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py'
rows = [
    dict(
        psa='mmseg/psa_ocrnet/psa-p_ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py',
        stock=ocr_stock,
        paper=dict(value=86.95, source=paper_source)),
    dict(
        psa='mmseg/psa_ocrnet/psa-s_ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py',
        stock=ocr_stock,
        paper=dict(value=86.72, source=paper_source)),
    dict(psa='mmseg/psa_hrnet/psa-p_fcn_hr48_4xb2-80k_cityscapes-512x1024.py', stock=fcn_stock),
    dict(psa='mmseg/psa_hrnet/psa-s_fcn_hr48_4xb2-80k_cityscapes-512x1024.py', stock=fcn_stock),
]
