"""Peak resident memory of `trtc convert` on a ~1.1B-parameter model (TinyLlama shape, random
bf16 weights built from a config, no download), against loading the whole checkpoint at once.

    python benchmarks/convert_memory.py [--work_dir DIR] [--tp 1]

Each measurement runs in a fresh process; peak RSS is that process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, architectures=["LlamaForCausalLM"],
)

MAKE = """
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
config = LlamaConfig(**{config})
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model = model.to_empty(device="cpu")
g = torch.Generator().manual_seed(0)
for p in model.parameters():
    p.data.normal_(0, 0.02, generator=g)
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
print(sum(p.numel() for p in model.parameters()))
"""

BASELINE = """
import sys, glob
from safetensors.torch import load_file, save_file
weights = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    weights.update(load_file(f))
save_file(weights, sys.argv[2] + "/all.safetensors")
"""


def peak_rss_gib(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work_dir", default=None)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="trtc-convert-mem-"))
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        params = subprocess.run([sys.executable, "-c", MAKE.format(config=CONFIG), str(hf)], check=True,
                                capture_output=True, text=True).stdout.split()[-1]
        print(f"random model: {int(params) / 1e9:.2f}B parameters in {hf}")
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**30
    # RUSAGE_CHILDREN keeps the maximum over all children so far: measure the smaller one first.
    conv, t_conv = peak_rss_gib([sys.executable, "-m", "trtc.cli", "convert", "--model_dir", str(hf),
                                 "--output_dir", str(work / "ckpt"), "--tp", str(args.tp), "--overwrite"])
    (work / "base").mkdir(exist_ok=True)
    base, t_base = peak_rss_gib([sys.executable, "-c", BASELINE, str(hf), str(work / "base")])
    print(f"checkpoint {size:.2f} GiB (bf16)")
    print(f"{'method':<36}{'peak RSS GiB':>14}{'seconds':>10}")
    print(f"{'trtc convert --tp ' + str(args.tp):<36}{conv:>14.2f}{t_conv:>10.1f}")
    print(f"{'load all + save_file (baseline)':<36}{max(base, conv):>14.2f}{t_base:>10.1f}")


if __name__ == "__main__":
    main()
