"""MMSegmentation integration: PSA backbones, neck and heads, the hierarchical multi-scale
OCR segmentor (mmseg's MODELS), and the converter of the released checkpoints."""
from . import backbones, heads, mscale_ocr, necks, released  # noqa: F401  (registers)
