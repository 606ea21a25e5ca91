"""Deterministic tiny datasets in the real Cityscapes and COCO-keypoint formats."""
