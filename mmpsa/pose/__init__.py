"""MMPose integration: PSA backbones, neck and heatmap head (mmpose's MODELS)."""
from . import backbones, heads, necks  # noqa: F401  (registers)
