"""The optimization profile of the TensorRT plans, from the build limits (pure arithmetic: tested
where TensorRT is absent too)."""

from __future__ import annotations

from models import make_hf_model

from trtc.backends.tensorrt.profiles import optimization_profile
from trtc.converters.convert import convert
from trtc.formats.build_config import BuildConfig
from trtc.formats.checkpoint import CheckpointConfig


def test_optimization_profile_from_build_limits(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama3_gqa", hidden_size=128)  # 4 heads of 32, 2 KV heads
    cfg = CheckpointConfig.load(convert(hf, tmp_path / "ckpt", progress=False))
    bc = BuildConfig(tokens_per_block=16, max_seq_len=100, max_num_tokens=512, max_batch_size=8)
    p = optimization_profile(cfg.graph, cfg.mapping, bc.resolved(cfg.graph, cfg.dtype))
    assert p["input_ids"] == ((1,), (8,), (512,))
    assert p["logits_indices"] == ((1,), (8,), (512,))
    assert p["block_tables"] == ((1, 1), (8, 7), (8, 7))  # ceil(100 / 16) blocks per sequence
    assert p["query_start_loc"] == ((2,), (9,), (9,))
    assert p["kv_cache_pool.1"] == ((2, 1, 16, 2, 32), (2, 50, 16, 2, 32), (2, 50, 16, 2, 32))  # 8 x 100 tokens
    small = optimization_profile(cfg.graph, cfg.mapping, BuildConfig(max_batch_size=64, max_num_tokens=16,
                                                                        max_seq_len=64).resolved(cfg.graph, cfg.dtype))
    assert small["context_lens"] == ((1,), (16,), (16,))  # no more sequences than tokens in a step
