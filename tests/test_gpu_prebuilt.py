"""An engine built for the GPU on a machine without it, tuned at its first load on the GPU (skipped
without one). The CPU runner's build is reproduced here by rewriting a GPU build's config.json to
what `trtc build --target` writes there (no tactics, tuning "untuned", no GPU name): the rank files
are the same either way (tests/test_build_pipeline_cli.py compares them).

The first load tunes and stores the tactics (config.json replaced atomically), a second load finds
them and tunes nothing, `trtc tune` says so, and the tuned engine computes what the build-tuned one
does. The model is a compressed-tensors W4A16 checkpoint (made by the compressed-tensors library)
in float16, so the GPU kernels and their tactics are the ones quantized engines use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import cli
from ct_checkpoints import make_ct_model

from trtc.compiler.tune import UNTUNED
from trtc.runtime.executor import Executor

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_first_load_tunes_once_and_stores_the_tactics(tmp_path):
    oracle, qdir = make_ct_model(tmp_path, "W4A16", hidden_size=256, intermediate_size=512)
    assert cli("convert", "--model_dir", qdir, "--output_dir", tmp_path / "ckpt", "--dtype", "float16").exit_code == 0
    result = cli("build", "--checkpoint_dir", tmp_path / "ckpt", "--output_dir", tmp_path / "built",
                 "--max_batch_size", 4, "--max_seq_len", 128, "--max_num_tokens", 64)
    assert result.exit_code == 0, result.output
    built = json.loads((tmp_path / "built" / "config.json").read_text())
    assert built["tactics"]["gemm"]

    prebuilt = tmp_path / "prebuilt"
    shutil.copytree(tmp_path / "built", prebuilt)
    config = {**built, "tactics": {}, "tuning": UNTUNED, "target": {**built["target"], "gpu_name": None}}
    (prebuilt / "config.json").write_text(json.dumps(config))
    assert json.loads(cli("inspect", prebuilt, "--json").output)["tactics"]["state"] == "untuned"

    prompt = list(range(3, 60))
    ex = Executor(prebuilt)  # tunes here
    try:
        got = ex.prompt_logits([prompt])[0]
    finally:
        ex.close()
    tuned = json.loads((prebuilt / "config.json").read_text())
    assert tuned["tuning"]["state"] == "tuned" and tuned["target"]["gpu_name"] == torch.cuda.get_device_name()
    assert set(tuned["tactics"]["gemm"]) == set(built["tactics"]["gemm"])
    assert tuned["build_id"] == built["build_id"]
    stamp = (prebuilt / "config.json").stat().st_mtime_ns

    ex = Executor(prebuilt)  # finds them: no tuning, nothing written
    try:
        again = ex.prompt_logits([prompt])[0]
    finally:
        ex.close()
    assert (prebuilt / "config.json").stat().st_mtime_ns == stamp
    result = cli("tune", prebuilt)
    assert result.exit_code == 0 and "already tuned" in result.output

    ex = Executor(tmp_path / "built")
    try:
        want = ex.prompt_logits([prompt])[0]
    finally:
        ex.close()
    # the same weights and kernels; tactics may differ in split-K, so float16 summation order only
    for logits in (got, again):
        assert float((logits - want).abs().max() / want.abs().max()) < 1e-2
    with torch.no_grad():
        ref = oracle(torch.tensor([prompt])).logits[0]
    assert float((got.cpu().float() - ref).abs().max() / ref.abs().max()) < 2e-2
