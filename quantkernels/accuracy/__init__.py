"""Accuracy tools: calibration, better rounding than round-to-nearest, quantization-aware training,
sensitivity analysis and automatic mixed precision."""
