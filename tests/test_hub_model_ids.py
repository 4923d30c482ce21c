"""Hugging Face model ids for --model_dir and LLM(...), without a network: a local cache in
huggingface_hub's layout (tests/hub_cache.py) read with HF_HUB_OFFLINE=1, run as a CI job would
(a `python -m trtc.cli` process with the environment set)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, cli
from hub_cache import populate
from models import add_word_tokenizer, make_hf_model

from trtc.converters.hub import ALLOW_PATTERNS

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    hf = add_word_tokenizer(make_hf_model(root / "hf", "llama3_gqa"))
    populate(root / "cache", REPO, hf, COMMIT, refs=("main",))
    return root, hf


def trtc(root: Path, *args, offline: bool = True, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1" if offline else "0",
               "PYTHONPATH": str(Path(__file__).parents[1]), **env}
    return subprocess.run([sys.executable, "-m", "trtc.cli", *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=300)


def one_line(proc: subprocess.CompletedProcess, *words) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for w in words:
        assert w in lines[0], lines[0]


def test_model_id_from_the_cache_converts_like_its_directory(hub, tmp_path):
    root, hf = hub
    for source, out in (([REPO], "by_id"), ([REPO, "--revision", COMMIT], "by_commit"), ([hf], "by_dir")):
        proc = trtc(root, "convert", "--model_dir", *source[:1], *source[1:], "--output_dir", tmp_path / out)
        assert proc.returncode == 0, proc.stderr
    want = (tmp_path / "by_dir" / "rank0.safetensors").read_bytes()
    assert (tmp_path / "by_id" / "rank0.safetensors").read_bytes() == want
    assert (tmp_path / "by_commit" / "rank0.safetensors").read_bytes() == want
    assert (tmp_path / "by_id" / "tokenizer" / "tokenizer.json").is_file()


def test_build_and_llm_take_a_model_id(hub, tmp_path, monkeypatch):
    root, _ = hub
    proc = trtc(root, "build", "--model_dir", REPO, "--output_dir", tmp_path / "engine", "--max_seq_len", 64)
    assert proc.returncode == 0, proc.stderr
    proc = trtc(root, "run", "--engine_dir", tmp_path / "engine", "--input_text", "w1 w2", "--max_output_len", 4)
    assert proc.returncode == 0, proc.stderr
    # LLM(model_id) in this process: huggingface_hub read its environment at import, so set its constants
    import huggingface_hub.constants as constants

    from trtc import LLM

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TRTC_CACHE_DIR", str(tmp_path / "trtc_cache"))
    with LLM(REPO, build_config=None) as llm:
        assert llm.engine_dir.is_relative_to(tmp_path / "trtc_cache")
        out = llm.generate([5, 6, 7])
        assert len(out.token_ids) > 0


def test_offline_or_unreachable_is_one_line(hub, tmp_path):
    root, _ = hub
    out = ["--output_dir", tmp_path / "o"]
    one_line(trtc(root, "convert", "--model_dir", "tiny-org/absent", *out), "tiny-org/absent", "HF_HUB_OFFLINE",
             "local directory")
    one_line(trtc(root, "convert", "--model_dir", REPO, "--revision", "v9", *out), "revision v9", "HF_HUB_OFFLINE")
    # no network: an endpoint that refuses connections
    one_line(trtc(root, "convert", "--model_dir", "tiny-org/absent", *out, offline=False,
                  HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2"),
             "cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE=1", "local directory")
    # neither a directory nor a model id; a revision of a local directory (in this process: no Hub involved)
    assert_one_line_error(cli("convert", "--model_dir", "./no/such/dir", *out), "does not exist", "model id")
    assert_one_line_error(cli("convert", "--model_dir", root / "hf", "--revision", "main", *out), "--revision", "local")
    assert not (tmp_path / "o").exists()


def test_only_the_files_trtc_reads_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "hf_quant_config.json",
            "pytorch_model.bin", "original/consolidated.00.pth", "README.md", "LICENSE", "onnx/model.onnx",
            "tokenizer.model"]
    got = set(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS))
    assert got == set(repo) - {"pytorch_model.bin", "original/consolidated.00.pth", "README.md", "LICENSE",
                               "onnx/model.onnx"}
