"""`trtc convert` through the CLI: outputs, determinism and every bad input of the foundation issue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error as _assert_error
from click.testing import CliRunner
from models import make_hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trtc.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("hf") / "llama", "llama3_gqa")


def assert_one_line_error(result, *words):
    _assert_error(result, *words, whole_output=True)


def run(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def test_convert_writes_checkpoint(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = run("--model_dir", hf_dir, "--output_dir", out, "--tp", 2, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "trtc-checkpoint" and config["mapping"]["tp_size"] == 2
    assert config["dtype"] == "bfloat16" and config["quantization"] is None
    for rank in range(2):
        with safe_open(str(out / f"rank{rank}.safetensors"), "pt") as f:
            emb = f.get_slice("embedding.weight")
            assert emb.get_shape() == [66, 64]  # vocab 131 padded to 132, split in two
            assert f.get_slice("layers.0.attention.q.weight").get_shape() == [32, 64]
            assert str(f.get_tensor("layers.0.attention.o.weight").dtype) == "torch.bfloat16"
    # the padded vocabulary row is zero
    assert load_file(str(out / "rank1.safetensors"))["embedding.weight"][-1].abs().sum() == 0
    assert (out / "tokenizer" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_convert_is_deterministic_and_tp_size_alias(hf_dir, tmp_path):
    assert run("--model_dir", hf_dir, "--output_dir", tmp_path / "a", "--tp_size", 2).exit_code == 0
    assert run("--model_dir", hf_dir, "--output_dir", tmp_path / "b", "--tp", 2).exit_code == 0
    for name in ("config.json", "rank0.safetensors", "rank1.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_sharded_index_checkpoint(tmp_path):
    src = make_hf_model(tmp_path / "one", "qwen2_tied")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert run("--model_dir", tmp_path / "one", "--output_dir", tmp_path / "c1").exit_code == 0
    assert run("--model_dir", tmp_path / "sharded", "--output_dir", tmp_path / "c2").exit_code == 0
    assert (tmp_path / "c1" / "rank0.safetensors").read_bytes() == (tmp_path / "c2" / "rank0.safetensors").read_bytes()


def broken_copy(hf_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(hf_dir, d)
    return d


def test_missing_dir(tmp_path):
    assert_one_line_error(run("--model_dir", tmp_path / "nope", "--output_dir", tmp_path / "o"), "does not exist")


def test_missing_config(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    (d / "config.json").unlink()
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"), "config.json", "missing")


def test_invalid_config(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    (d / "config.json").write_text("{ not json")
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"), "not valid JSON")


def test_unsupported_architecture(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"),
                          "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
                          "Gemma3ForCausalLM", "Phi3ForCausalLM", "NemotronForCausalLM", "Exaone4ForCausalLM")


def test_pickle_weights_refused(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"), "pickle", "safetensors")


def test_missing_weight_file(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    (d / "model.safetensors").unlink()
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"), "no *.safetensors")


def test_missing_shard_of_index(tmp_path):
    src = make_hf_model(tmp_path / "one", "llama3_gqa")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    assert_one_line_error(run("--model_dir", tmp_path / "sharded", "--output_dir", tmp_path / "o"), "missing")


def test_missing_tensor(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    weights = load_file(str(d / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"), "model.layers.1.mlp.up_proj.weight", "missing")


def test_unexpected_tensor(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    weights = load_file(str(d / "model.safetensors"))
    weights["model.layers.0.self_attn.extra.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"), "model.layers.0.self_attn.extra.weight")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(hf_dir, tmp_path, damage):
    d = broken_copy(hf_dir, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    result = run("--model_dir", d, "--output_dir", tmp_path / "o")
    assert_one_line_error(result, "model.safetensors")
    assert not (tmp_path / "o").exists()


def test_shape_contradicts_config(hf_dir, tmp_path):
    d = broken_copy(hf_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("--model_dir", d, "--output_dir", tmp_path / "o"), "shape", "[96, 64]", "[128, 64]")


def test_tp_not_dividing_heads(hf_dir, tmp_path):
    assert_one_line_error(run("--model_dir", hf_dir, "--output_dir", tmp_path / "o", "--tp", 3), "--tp 3", "4 attention heads",
                          "valid --tp values for this model: 1, 2, 4")
    assert not (tmp_path / "o").exists()


def test_existing_output_dir(hf_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(run("--model_dir", hf_dir, "--output_dir", out), "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "user data"
    assert run("--model_dir", hf_dir, "--output_dir", out, "--overwrite").exit_code == 0
    assert (out / "rank0.safetensors").is_file() and not (out / "keep.txt").exists()


def test_unknown_dtype(hf_dir, tmp_path):
    result = run("--model_dir", hf_dir, "--output_dir", tmp_path / "o", "--dtype", "float64")
    assert result.exit_code != 0 and "float64" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_nothing(hf_dir, tmp_path):
    """A tensor that cannot be read while writing (damaged data, intact header) leaves no output."""
    d = broken_copy(hf_dir, tmp_path)
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-64]))  # the last tensor's bytes are cut
    result = run("--model_dir", d, "--output_dir", tmp_path / "o")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert list(tmp_path.glob("o*")) == [] and list(tmp_path.glob(".o*")) == []


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trtc.cli", "convert", "--model_dir", str(tmp_path / "x"),
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
