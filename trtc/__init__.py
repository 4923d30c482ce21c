"""trtc: an ahead-of-time compiler and runtime for large language models."""

from trtc.errors import TrtcError
from trtc.version import __version__

__all__ = ["LLM", "LoRARequest", "SamplingParams", "SpeculativeConfig", "TrtcError", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `trtc --help` does not pay for torch and transformers.
    if name == "LLM":
        from trtc.llm import LLM

        return LLM
    if name == "SamplingParams":
        from trtc.runtime.sampling_params import SamplingParams

        return SamplingParams
    if name == "LoRARequest":
        from trtc.runtime.lora import LoRARequest

        return LoRARequest
    if name == "SpeculativeConfig":
        from trtc.runtime.speculative import SpeculativeConfig

        return SpeculativeConfig
    raise AttributeError(f"module 'trtc' has no attribute {name!r}")
