"""Backends other than the built-in cuda one (trtc/runtime/model_runner.py)."""
