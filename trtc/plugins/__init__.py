"""Plugins: one folder per op, each with a plain PyTorch reference (runs on any device) and,
later, its fast kernels."""
