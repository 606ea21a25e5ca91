"""MMSegmentation integration: PSA backbones, neck and heads (mmseg's MODELS)."""
from . import backbones, heads, necks  # noqa: F401  (registers)
