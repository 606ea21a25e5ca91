"""Layers that import neither mmseg nor mmpose."""
