"""`trtc bench --concurrency 1,2` sweeps (one run per value, a JSON list) and benchmarks/plot_bench.py
draws the plots of the docs' performance page from that JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, cli
from serve_helpers import REPO, stories260k


def test_sweep_writes_one_result_per_level_and_plots_them(tmp_path):
    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig

    engine = build_from_hf(stories260k(), tmp_path / "engine", build_config=BuildConfig(max_batch_size=4, max_seq_len=64),
                           progress=False)
    out = tmp_path / "sweep.json"
    r = cli("bench", "--engine_dir", engine, "--isl", 8, "--osl", 4, "--num_requests", 4, "--concurrency", "1,2",
            "--output_json", out, "--quiet")
    assert r.exit_code == 0, r.output
    results = json.loads(out.read_text())
    assert [x["concurrency"] for x in results] == [1, 2]
    assert all(x["num_requests"] == 4 and x["output_tokens_per_s"] > 0 for x in results)
    assert r.output.count("mode throughput") == 2

    pytest.importorskip("matplotlib", reason="the docs extra is not installed (pip install -e '.[docs]')")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from plot_bench import plot

    paths = plot(results, tmp_path / "img", "cpu")
    assert [p.name for p in paths] == ["cpu_throughput.png", "cpu_pareto.png", "cpu_latency.png"]
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_bad_concurrency_list_is_one_line(tmp_path):
    assert_one_line_error(cli("bench", "--engine_dir", tmp_path, "--concurrency", "1,x"), "comma-separated")
    assert_one_line_error(cli("bench", "--engine_dir", tmp_path, "--concurrency", "0,4"), "at least 1")
