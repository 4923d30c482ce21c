"""`trtc build --backend tensorrt` where TensorRT is absent (the machines trtc is developed on):
the ONNX graphs and their metadata are written, then one line says so, where they are and how to
finish; every misuse of --from_onnx is one line too. Where TensorRT is installed these tests are
skipped (test_tensorrt_engine.py builds real plans there)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from models import add_word_tokenizer, make_hf_model

from trtc.backends import tensorrt
from trtc.cli import main
from trtc.compiler import build as build_module
from trtc.converters.convert import convert

pytestmark = pytest.mark.skipif(tensorrt.available(), reason="TensorRT is installed: plans are built instead")
LIMITS = ["--tokens_per_block", 4, "--max_seq_len", 64, "--max_num_tokens", 16, "--max_batch_size", 4]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *words) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_cli")
    hf = add_word_tokenizer(make_hf_model(root / "hf", "llama3_gqa"))
    return convert(hf, root / "ckpt", progress=False)


@pytest.fixture(scope="module")
def onnx_build(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt_build") / "engine"
    result = cli("build", "--checkpoint_dir", ckpt, "--output_dir", out, "--backend", "tensorrt", *LIMITS)
    return out, result


def test_build_without_tensorrt_writes_onnx_then_one_line(onnx_build):
    out, result = onnx_build
    one_line_error(result, "TensorRT is not installed", f"{out}/onnx", f"trtc build --from_onnx {out} --output_dir")
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == "tensorrt" and config["tensorrt"] is None
    assert config["build_config"]["max_batch_size"] == 4
    for name in ("onnx/rank0.onnx", "onnx/rank0.onnx.data", "onnx/plugins.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "rank0.engine").exists()
    assert [p.name for p in out.parent.iterdir()] == ["engine"]  # no temporary directory left beside it


def test_run_and_finish_without_tensorrt(onnx_build, tmp_path):
    out, _ = onnx_build
    one_line_error(cli("run", "--engine_dir", out, "--input_text", "w1 w2"), "only the ONNX graphs", "--from_onnx")
    one_line_error(cli("build", "--from_onnx", out, "--output_dir", tmp_path / "plans"), "TensorRT is not installed",
                   f"trtc build --from_onnx {out}")
    assert not (tmp_path / "plans").exists()


def test_from_onnx_bad_input(onnx_build, ckpt, tmp_path):
    out, _ = onnx_build
    plans = ["--output_dir", tmp_path / "plans"]
    one_line_error(cli("build", "--from_onnx", tmp_path / "nope", *plans), "does not exist")
    one_line_error(cli("build", "--from_onnx", ckpt, *plans), "not a trtc-engine directory")
    cuda = tmp_path / "cuda"
    assert cli("build", "--checkpoint_dir", ckpt, "--output_dir", cuda, "--backend", "cuda", *LIMITS).exit_code == 0
    one_line_error(cli("build", "--from_onnx", cuda, *plans), "backend 'cuda'", "not a tensorrt build")
    one_line_error(cli("build", "--from_onnx", out, *plans, "--tokens_per_block", 8), "--tokens_per_block",
                   "decided when the ONNX graphs are written")
    one_line_error(cli("build", "--from_onnx", out, *plans, "--checkpoint_dir", ckpt), "--checkpoint_dir")
    one_line_error(cli("build", "--from_onnx", out, *plans, "--backend", "cuda"), "--backend")
    one_line_error(cli("build", "--from_onnx", out, *plans, "--backend", "tensorrt", "--max_batch_size", 2),
                   "TensorRT is not installed")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    one_line_error(cli("build", "--from_onnx", broken, *plans), "plugins.json is missing", "--backend tensorrt")
    assert not (tmp_path / "plans").exists()


def test_model_dir_shortcut_and_auto_backend(tmp_path, monkeypatch):
    hf = make_hf_model(tmp_path / "hf", "qwen3_qknorm")
    out = tmp_path / "engine"
    one_line_error(cli("build", "--model_dir", hf, "--output_dir", out, "--backend", "tensorrt", *LIMITS),
                   "TensorRT is not installed")
    assert (out / "onnx" / "rank0.onnx").is_file()
    assert build_module.resolve_backend("auto") == "cuda"
    monkeypatch.setattr(tensorrt, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_module.resolve_backend("auto") == "cuda"  # TensorRT without a GPU builds nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_module.resolve_backend("auto") == "tensorrt"


def test_failed_lowering_leaves_no_directory(ckpt, tmp_path, monkeypatch):
    from trtc.errors import TrtcError
    from trtc.onnx import export

    def fail(spec):
        raise TrtcError("the lowering failed here")

    monkeypatch.setattr(export, "lower", fail)
    one_line_error(cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "e", "--backend", "tensorrt"),
                   "the lowering failed here")
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_backend_needs_onnx(ckpt, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    one_line_error(cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "e", "--backend", "tensorrt"),
                   "needs the onnx package", "trtc[onnx]")
    assert not (tmp_path / "e").exists()


def test_tensorrt_without_gpu_stops_after_onnx(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "e"
    one_line_error(cli("build", "--checkpoint_dir", ckpt, "--output_dir", out, "--backend", "tensorrt", *LIMITS),
                   "builds plans on a GPU and this machine has none", f"--from_onnx {out}")
    assert (out / "onnx" / "plugins.json").is_file()
    one_line_error(cli("build", "--from_onnx", out, "--output_dir", tmp_path / "plans"), "has none")
