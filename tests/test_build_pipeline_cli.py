"""`trtc build` for CI pipelines on CPU: --config YAML files, the memory plan (--dry_run, the check
against --gpu_memory / a named GPU), --target for a GPU this machine lacks (untuned engine,
refusals), `trtc tune` without a GPU, and `trtc inspect`."""

from __future__ import annotations

import json
import time

import pytest
import torch
from cli_helpers import assert_one_line_error, cli
from models import add_word_tokenizer, load_hf, make_hf_model

from trtc.compiler.memory_plan import OVERHEAD
from trtc.compiler.tune import tune_at_first_load, update_engine_config
from trtc.formats.engine import Engine
from trtc.runtime.executor import Executor

SMALL = ["--max_batch_size", 4, "--max_seq_len", 64, "--max_num_tokens", 16, "--tokens_per_block", 4]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An HF dir with a tokenizer and its float32 checkpoint."""
    root = tmp_path_factory.mktemp("pipeline")
    hf = add_word_tokenizer(make_hf_model(root / "hf", "llama3_gqa"))
    assert cli("convert", "--model_dir", hf, "--output_dir", root / "ckpt", "--dtype", "float32").exit_code == 0
    return hf, root / "ckpt"


# --config ------------------------------------------------------------------------------------------
def test_config_file_flags_command_line_wins_and_is_recorded(model, tmp_path):
    hf, ckpt = model
    yaml_file = tmp_path / "build.yaml"
    yaml_file.write_text(f"checkpoint_dir: {ckpt}\nmax_batch_size: 4\nmax-seq-len: 64\nmax_num_tokens: 16\n"
                         "tokens_per_block: 4\nbackend: cuda\n")
    result = cli("build", "--config", yaml_file, "--output_dir", tmp_path / "e", "--max_batch_size", 2)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    bc = config["build_config"]
    assert (bc["max_batch_size"], bc["max_seq_len"], bc["max_num_tokens"], bc["tokens_per_block"]) == (2, 64, 16, 4)
    flags = config["build_flags"]
    assert flags["config_file"] == str(yaml_file) and flags["max_batch_size"] == 2 and flags["max_seq_len"] == 64
    assert flags["sources"]["max_batch_size"] == "command line" and flags["sources"]["max_seq_len"] == "config file"
    assert "output_dir" not in flags  # where it went is not what was built: builds stay byte-identical
    # the engine runs: its prompt logits (prefilled in chunks of the file's 16-token budget) are HF's
    prompt = list(range(3, 43))
    ex = Executor(tmp_path / "e", kv_cache_max_tokens=256)
    try:
        got = ex.prompt_logits([prompt])[0]
    finally:
        ex.close()
    with torch.no_grad():
        want = load_hf(hf)(torch.tensor([prompt])).logits[0]
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_config_file_switches_and_lists(model, tmp_path):
    hf, _ = model
    (tmp_path / "b.yaml").write_text(f"model_dir: {hf}\nfp8: true\ncalib_dataset: [a.txt, b.txt]\n"
                                     "output_json: plan.json\n")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)
        weights = {}
        for extra in ([], ["--int4_awq", "--group_size", 32]):  # the command line's format wins over the file's
            result = cli("build", "--config", "b.yaml", "--dry_run", *extra)
            assert result.exit_code == 0, result.output
            weights[len(extra)] = json.loads((tmp_path / "plan.json").read_text())["memory_plan"]["weights"]
        assert cli("build", "--model_dir", hf, "--dry_run", "--output_json", "plan.json").exit_code == 0
        full = json.loads((tmp_path / "plan.json").read_text())["memory_plan"]["weights"]
    # float32 embedding + LM head (2 x 131 x 64 x 4 bytes) and norms stay; the linears shrink 4x (FP8), 8x (INT4)
    linears = full - 2 * 131 * 64 * 4 - 5 * 64 * 4
    assert weights[0] < full - linears * 0.7 and weights[3] < weights[0] - linears / 16  # INT4: + group scales


@pytest.mark.parametrize("text, words", [
    ("max_batch_sizes: 4\n", ["'max_batch_sizes'", "not a flag of `trtc build`", "max_batch_size"]),
    ("max_batch_size: [4\n", ["not valid YAML", "line"]),
    ("- 4\n", ["not a mapping"]),
    ("max_batch_size: many\n", ["max_batch_size", "many"]),
    ("fp8: 1\n", ["fp8", "switch"]),
])
def test_bad_config_files(model, tmp_path, text, words):
    _, ckpt = model
    (tmp_path / "b.yaml").write_text(text)
    result = cli("build", "--config", tmp_path / "b.yaml", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "o")
    assert_one_line_error(result, *words)
    assert not (tmp_path / "o").exists()


def test_missing_config_file(tmp_path):
    assert_one_line_error(cli("build", "--config", tmp_path / "nope.yaml"), "nope.yaml")


# memory plan -----------------------------------------------------------------------------------------
def test_dry_run_prints_the_plan_and_builds_nothing(model, tmp_path):
    hf, ckpt = model
    for source in (["--checkpoint_dir", ckpt], ["--model_dir", hf, "--dtype", "float32"]):
        result = cli("build", *source, "--dry_run", *SMALL, "--target", "h200", "--output_json", tmp_path / "p.json")
        assert result.exit_code == 0, result.output
        assert "GPU memory 139.80 GiB" in result.output and "at max_batch_size 4 x max_seq_len 64" in result.output
        assert "the plan fits" in result.output
        plan = json.loads((tmp_path / "p.json").read_text())["memory_plan"]
        # KV cache: 2 layers x k,v x 2 KV heads x head dim 16 x float32, per token
        assert plan["kv_per_token"] == 2 * 2 * 2 * 16 * 4 and plan["kv_cache"] == plan["kv_per_token"] * 4 * 64
        assert plan["fits"] and plan["full_length_sequences"] >= 4
    # the weights estimate against the built engine's rank file (its header aside)
    assert cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "e", *SMALL).exit_code == 0
    size = (tmp_path / "e" / "rank0.engine").stat().st_size
    assert 0 < size - plan["weights"] < 4096, (size, plan["weights"])
    assert json.loads((tmp_path / "e" / "config.json").read_text())["memory_plan"]["weights"] == plan["weights"]


def test_tensor_parallel_plan_is_per_rank(model, tmp_path):
    hf, _ = model
    plans = {}
    for tp in (1, 2):
        result = cli("build", "--model_dir", hf, "--dtype", "float32", "--tp", tp, "--dry_run", *SMALL,
                     "--output_json", tmp_path / f"{tp}.json")
        assert result.exit_code == 0, result.output
        plans[tp] = json.loads((tmp_path / f"{tp}.json").read_text())["memory_plan"]
    assert plans[2]["kv_per_token"] * 2 == plans[1]["kv_per_token"]  # 2 KV heads split over 2 ranks
    assert plans[1]["weights"] / 2 < plans[2]["weights"] < plans[1]["weights"]  # norms replicated


@pytest.mark.parametrize("flags, gib, words", [
    ([], 1.0001, ["weights need", "--tp"]),
    (["--max_num_tokens", 2_000_000], 2, ["--max_num_tokens 2000000", "lower --max_num_tokens"]),
    (["--max_seq_len", 10_000_000], 2, ["--max_seq_len 10000000", "lower --max_seq_len"]),
])
def test_a_plan_that_cannot_fit_stops_in_seconds_naming_the_flag(model, tmp_path, flags, gib, words):
    hf, ckpt = model
    for source in (["--checkpoint_dir", ckpt], ["--model_dir", hf]):
        for dry in ([], ["--dry_run"]):
            start = time.perf_counter()
            result = cli("build", *source, "--output_dir", tmp_path / "o", "--max_batch_size", 4, *flags,
                         "--gpu_memory", gib, *dry)
            assert_one_line_error(result, *words)
            assert time.perf_counter() - start < 10
            assert not (tmp_path / "o").exists()
    assert OVERHEAD < 1.0001 * 2**30


# --target ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sm90_engine(model, tmp_path_factory):
    _, ckpt = model
    out = tmp_path_factory.mktemp("sm90") / "engine"
    result = cli("build", "--checkpoint_dir", ckpt, "--output_dir", out, "--target", "sm90", *SMALL)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runner's view: no GPU here")
def test_target_sm90_on_cpu_writes_an_untuned_engine_that_refuses_here(sm90_engine, model, tmp_path):
    config = json.loads((sm90_engine / "config.json").read_text())
    assert config["target"] == {"device": "cuda", "compute_capability": "9.0", "gpu_name": None}
    assert config["tuning"]["state"] == "untuned" and config["tactics"] == {}
    assert config["backend"] == "cuda"
    # the same weights as a build for this machine: only the target differs
    _, ckpt = model
    assert cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "cpu", *SMALL).exit_code == 0
    assert (tmp_path / "cpu" / "rank0.engine").stat().st_size == (sm90_engine / "rank0.engine").stat().st_size
    assert_one_line_error(cli("run", "--engine_dir", sm90_engine, "--input_text", "w1"), "compute capability 9.0",
                          "no GPU")
    assert_one_line_error(cli("tune", sm90_engine), "compute capability 9.0", "has none")
    engine = Engine.load(sm90_engine)
    assert tune_at_first_load(engine, torch.device("cpu")) is engine  # tuning happens only on a GPU
    assert json.loads((sm90_engine / "config.json").read_text()) == config  # nothing written


def test_gpu_names_and_bad_targets(model, tmp_path):
    _, ckpt = model
    result = cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "h100", "--target", "H100", *SMALL)
    assert result.exit_code == 0, result.output
    target = json.loads((tmp_path / "h100" / "config.json").read_text())["target"]
    if not torch.cuda.is_available():
        assert target["compute_capability"] == "9.0" and target["gpu_model"] == "h100"
    assert_one_line_error(cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "o", "--target", "sm9x"),
                          "--target 'sm9x'", "sm90", "h200")
    if not torch.cuda.is_available():
        assert_one_line_error(cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "o", "--target", "sm90",
                                  "--backend", "tensorrt"), "--backend cuda")
    assert not (tmp_path / "o").exists()


def test_tune_refuses_a_cpu_engine(model, tmp_path):
    _, ckpt = model
    assert cli("build", "--checkpoint_dir", ckpt, "--output_dir", tmp_path / "e", "--target", "cpu", *SMALL).exit_code == 0
    assert_one_line_error(cli("tune", tmp_path / "e"), "built for the CPU", "--target")


def test_engine_config_is_replaced_atomically(sm90_engine, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(sm90_engine, engine)
    before = json.loads((engine / "config.json").read_text())
    update_engine_config(engine, {"tactics": {"gemm": {}}, "tuning": {"state": "tuned"}})
    after = json.loads((engine / "config.json").read_text())
    assert after == {**before, "tactics": {"gemm": {}}, "tuning": {"state": "tuned"}}
    assert sorted(p.name for p in engine.iterdir()) == sorted(p.name for p in sm90_engine.iterdir())  # no temp file left
    assert Engine.load(engine).tuning == {"state": "tuned"}


# inspect ------------------------------------------------------------------------------------------
def test_inspect_engine_and_checkpoint(sm90_engine, model, tmp_path):
    _, ckpt = model
    result = cli("inspect", sm90_engine)
    assert result.exit_code == 0, result.output
    for words in ("LlamaForCausalLM", "compute capability 9.0", "tactics        untuned", "max_batch_size 4",
                  "rank0.engine", "build id"):
        assert words in result.output, words
    info = json.loads(cli("inspect", sm90_engine, "--json").output)
    config = json.loads((sm90_engine / "config.json").read_text())
    assert info["kind"] == "engine" and info["build_id"] == config["build_id"] and info["tp_size"] == 1
    assert info["tactics"]["state"] == "untuned" and info["target"]["compute_capability"] == "9.0"
    assert info["build_config"] == config["build_config"] and info["dtype"] == "float32"
    assert info["files"]["rank0.engine"] == (sm90_engine / "rank0.engine").stat().st_size
    # the parameter count is the HF model's
    hf = load_hf(model[0])
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    info = json.loads(cli("inspect", ckpt, "--json").output)
    assert info["kind"] == "checkpoint" and info["quantization"] is None and "rank0.safetensors" in info["files"]
    assert_one_line_error(cli("inspect", tmp_path / "nope"), "does not exist")
    assert_one_line_error(cli("inspect", model[0]), "neither a trtc engine nor a trtc checkpoint")
