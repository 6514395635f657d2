"""Quantized weight formats (block-scaled FP8)."""
