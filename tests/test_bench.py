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


def test_max_throughput_mode_runs_every_request_to_osl(tmp_path):
    """Every request queued at once on a tiny engine: each generates exactly OSL tokens (no EOS stop),
    the figure is the tokens over the time, and the report names the published figure (none on CPU)."""
    from trtc.tools.bench import published_figure

    engine = build_from_hf(make_hf_model(tmp_path / "hf", "llama3_gqa"), tmp_path / "engine",
                           build_config=BuildConfig(max_batch_size=6, max_num_tokens=48, tokens_per_block=8),
                           progress=False)
    result = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--max_throughput", "--isl", "10",
                                       "--osl", "7", "--num_requests", "20", "--output_json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["mode"] == "max-throughput" and m["concurrency"] == 20 and m["completed"] == 20
    assert abs(m["output_tokens_per_s"] - 20 * 7 / m["seconds"]) < 1e-6 * m["output_tokens_per_s"]
    assert m["published"] is None and "published        none for cpu at 10/7" in result.output
    assert "output tokens/s" in result.output and "20 completed" in result.output

    # a time budget cancels what is still running and counts what was generated until then
    result = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--max_throughput", "--isl", "10",
                                       "--osl", "60", "--num_requests", "400", "--max_seconds", "0.5",
                                       "--output_json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["completed"] < 400 and b["output_tokens_per_s"] > 0 and b["seconds"] < 5

    bad = CliRunner().invoke(main, ["bench", "--engine_dir", str(engine), "--max_throughput", "--concurrency", "4"])
    assert bad.exit_code == 1 and "--max_throughput" in bad.output

    h100 = published_figure("NVIDIA H100 80GB HBM3", 128, 128)
    assert h100["card"] == "H100 SXM" and h100["best"] == 28837
    assert published_figure("NVIDIA H200", 2048, 128)["v1.0"] == 3538
    assert published_figure("NVIDIA A100-SXM4-80GB", 128, 128) is None and published_figure("NVIDIA H100", 64, 64) is None
