"""`trtc bench` on CPU: the figures it reports are consistent with the work it did."""

from __future__ import annotations

import json

from click.testing import CliRunner
from models import make_hf_model

from trtc.cli import main
from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig


def test_bench_throughput_and_latency(tmp_path):
    engine = build_from_hf(make_hf_model(tmp_path / "hf", "llama3_gqa"), tmp_path / "engine",
                           build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, tokens_per_block=8), progress=False)
    result = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--isl", "12", "--osl", "6",
                                       "--num_requests", "10", "--output_json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["mode"] == "throughput" and t["concurrency"] == 4  # the engine's max_batch_size
    assert abs(t["output_tokens_per_s"] - 10 * 6 / t["seconds"]) < 1e-6 * t["output_tokens_per_s"]
    assert 0 < t["ttft_ms"]["p50"] <= t["ttft_ms"]["p99"] and t["tpot_ms"]["mean"] > 0
    assert "output tokens/s" in result.output

    result = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--isl", "12", "--osl", "6", "--latency",
                                       "--output_json", str(tmp_path / "l.json")])
    assert result.exit_code == 0, result.output
    lat = json.loads((tmp_path / "l.json").read_text())
    assert lat["num_requests"] == 1 and lat["mode"] == "latency"
    # bytes per step: every weight but the embedding table, plus the KV cache read at the mean context
    assert lat["bytes_per_step"] > 0 and 0 < lat["mbu"] and lat["bandwidth_gbps"] > 0 and lat["load_seconds"] >= 0

    bad = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--isl", "250", "--osl", "10"])
    assert bad.exit_code == 1 and "max_seq_len" in bad.output and "Traceback" not in bad.output
