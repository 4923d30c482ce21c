"""The trtc version, written into every checkpoint and engine."""

__version__ = "0.1.0"
