"""Quantization: the quantized checkpoint layout (`layout.py`) and `trtc quantize`, which calibrates
with NVIDIA ModelOpt and imports its export through the converters (`quantize.py`)."""
