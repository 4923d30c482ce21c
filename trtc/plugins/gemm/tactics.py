"""GEMM tactics: which implementation, with which launch configuration, runs a quantized GEMM.

A quantized linear layer is identified by its kind and shape (`gemm_key`); the rows M of a call
fall into a bucket: the smallest tuned bucket at least M. The build times the candidates of each
(key, bucket) the engine will see on the build GPU (trtc/compiler/autotune.py) and stores the
winners in the engine's config.json; the engine's model runner reads them into its TacticTable at
load and passes it to every GEMM, so nothing is tuned while serving and two engines in one process
keep their own. A shape without a stored tactic (an engine built on a CPU) gets `default_tactic`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

TUNED_BUCKETS = (1, 16, 32, 64, 128, 256, 512, 2048, 8192, 32768)  # the build times these; M between two takes the larger


@dataclass(frozen=True)
class Tactic:
    impl: str  # "cuda" (INT4, M <= 64: trtc/plugins/gemm/w4a16_packed.py; block_n output features a block),
    # "triton" (trtc/plugins/gemm/triton_quant.py), "scaled_mm" (cuBLASLt FP8 through torch),
    # "triton_tc" (INT4, large M: w4a16_tc.gemm, dequantized in the mainloop for the tensor cores), or
    # "dequant_mm" (INT4: the weight dequantized to the model dtype, then cuBLAS: for large M, compute-bound)
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # triton_tc: out^T = W x^T, the dequantized weight as the A operand (from registers)

    def launch_args(self) -> dict[str, int]:
        """The Triton launch configuration of triton_quant.launch or w4a16_tc.gemm (which takes swap_ab too)."""
        d = asdict(self)
        d.pop("impl")
        if self.impl != "triton_tc":
            d.pop("swap_ab")
        return d


def gemm_key(weight, weight_scale) -> str:
    """'w4a16:n{N}:k{K}:g{group}' or 'fp8:n{N}:k{K}' for an INT4 weight uint8 [N, K/2] with scales
    [N, K/group] or an FP8 weight [N, K]. Takes tensors or safetensors slices."""
    shape, scale_shape = list(weight.get_shape() if hasattr(weight, "get_shape") else weight.shape), \
        list(weight_scale.get_shape() if hasattr(weight_scale, "get_shape") else weight_scale.shape)
    if len(scale_shape) == 2:
        k = shape[1] * 2
        return f"w4a16:n{shape[0]}:k{k}:g{k // scale_shape[1]}"
    return f"fp8:n{shape[0]}:k{shape[1]}"


def fit_stages(tactic: Tactic, group: int) -> Tactic:
    """The tactic with a pipeline that fits a Hopper block's 227 KiB of shared memory. A triton_tc tile
    whose K block spans several quantization groups (group < block_k) stages more bytes a stage; from
    128 x 128 x 128 (or 256 x 128 x 64) elements on it takes at most 3 stages, 2 with block_k 128
    (the sizes Triton compiles them to: tests/plugins/test_w4a16_tc.py)."""
    if tactic.impl != "triton_tc" or not group or group >= tactic.block_k:
        return tactic
    if tactic.block_m * tactic.block_n * tactic.block_k < 128 * 128 * 128:
        return tactic
    return replace(tactic, num_stages=min(tactic.num_stages, 2 if tactic.block_k >= 128 else 3))


def key_group(key: str) -> int:
    """The quantization group of a 'w4a16:...:g{group}' key; 0 for FP8."""
    return int(key.rsplit(":g", 1)[1]) if key.startswith("w4a16") else 0


def default_tactic(key: str, m: int, packed: bool = True) -> Tactic:
    """Configurations for an engine whose build did not tune (built on a CPU): among the winners of
    benchmarks/quant_gemm.py on the H200; INT4 past 64 rows: the tensor-core GEMM (w4a16_tc.py) with
    Hopper-sized tiles (benchmarks/w4a16_large_m.py compares it with dequantize + cuBLAS). packed: the INT4 layer
    has the CUDA kernel's layout (it has wherever the kernel compiles)."""
    if key.startswith("fp8"):
        return Tactic("triton", block_m=16, block_n=64, block_k=128, split_k=2) if m <= 16 else Tactic("scaled_mm")
    if packed and m <= 64:
        return Tactic("cuda", block_n=16 if m <= 16 else 32)
    if m <= 16:
        return Tactic("triton", block_m=16, block_n=64, block_k=128, split_k=2)
    if m <= 64:
        return Tactic("triton", block_m=32 if m <= 32 else 64, block_n=64, block_k=128)
    if m <= 128:
        return Tactic("triton_tc", block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4)
    if m <= 512:
        return Tactic("triton_tc", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
    return fit_stages(Tactic("triton_tc", block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=4), key_group(key))


class TacticTable:
    """key -> {tuned bucket: Tactic}: one engine's GEMM tactics, held by its model runner."""

    def __init__(self, gemm_tactics: dict[str, dict[str, dict]] | None = None) -> None:
        """gemm_tactics: config.json's tactics["gemm"]: {key: {bucket: Tactic fields}}."""
        self._table: dict[str, dict[int, Tactic]] = {
            key: {int(b): Tactic(**t) for b, t in per_bucket.items()} for key, per_bucket in (gemm_tactics or {}).items()
        }

    def choose(self, key: str, m: int) -> Tactic:
        """The tactic tuned for the smallest tuned bucket >= M (the largest one past them all)."""
        tuned = self._table.get(key)
        if not tuned:
            return default_tactic(key, m)
        return tuned[min((b for b in tuned if b >= m), default=max(tuned))]



def to_config(tuned: dict[str, dict[int, Tactic]]) -> dict[str, dict[str, dict]]:
    return {key: {str(b): asdict(t) for b, t in sorted(per.items())} for key, per in sorted(tuned.items())}
