# The released PSA_s Cityscapes network (86.72 val mIoU in the paper) and its evaluation: the
# PSA_p config (read its notes: conversion, test command, differences) with PSA_s (sequential)
# blocks.
_base_ = ['./psa-p_mscale-ocrnet_hr48_official_cityscapes-1024x2048.py']

model = dict(backbone=dict(psa=dict(mode='sequential')))
