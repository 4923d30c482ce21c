"""The memory plan of a build, before any work: what one rank of the engine needs on its GPU.

    weights      the rank's tensors in their checkpoint dtypes (quantized layers packed), from the
                 layer graph, the tensor-parallel split and the quantization (no file is read)
    KV cache     k and v of every layer for max_batch_size x max_seq_len tokens in the KV-cache
                 dtype (the most the scheduler can hold; the runtime sizes its pool from free memory)
    activations  one eager step of max_num_tokens tokens: the largest live tensors of a layer
                 (hidden, residual and norm output, qkv, rotated q/k, attention output, gate/up and its
                 activation, the projections' outputs; routed copies for MoE), decode attention's
                 split partials, and an INT4 layer's dequantized weight (the large-M tactic)
    logits       float32 logits of the rows a step samples (max_batch_size), the LM head's chunk of
                 LOGITS_CHUNK_ROWS rows in the model dtype, and the top-logprobs chunk
    sampling     the penalties' [max_batch_size, vocab] masks and counts, the guided-decoding
                 bitmasks, and the sampler's temporaries for one chunk of SAMPLING_CHUNK_ROWS rows
                 (sort, softmax, noise)
    graphs       the decode CUDA graphs' one shared memory pool: a decode forward at the largest
                 captured batch size and the graphs' shared float32 logits buffer
    KV pool      with a GPU memory figure: free_gpu_memory_fraction of what is left after weights,
                 OVERHEAD and the four figures above (the runtime sizes its pool the same way from
                 the memory it finds free, and from a profile run of the worst step where that is more)

A build fits when weights + activations + logits + sampling + graphs + the KV cache of one max_seq_len
sequence + OVERHEAD (CUDA context, cuBLAS workspaces) fit the target GPU's memory; otherwise it stops
before any work with one line naming the flag to change. The plan says how many full-length sequences
the rest holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trtc.converters.tp import shard_for
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig, kv_cache_torch_dtype
from trtc.formats.checkpoint import torch_dtype
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.formats.quant_layout import QuantConfig, checkpoint_dtype
from trtc.plugins.sampling.sampler import SAMPLING_CHUNK_ROWS

GIB = 2**30
OVERHEAD = 1 * GIB
LOGITS_CHUNK_ROWS = 256  # rows of the LM head computed at once (the model runner)
# bytes per [row, vocab] element the sampler holds at its peak (top-p: the processed logits, a sort's
# values and int64 indices, softmax, cumulative sum, masks, the filtered copy, noise, probabilities)
SAMPLER_BYTES_PER_ELEMENT = 64
PENALTY_BYTES_PER_ELEMENT = 5  # the repetition mask (bool) and the output counts (float32), whole batch
DEFAULT_FREE_GPU_MEMORY_FRACTION = 0.9


@dataclass
class MemoryPlan:
    tp_size: int
    weights: int  # bytes per rank (the largest rank)
    kv_cache: int  # bytes per rank at max_batch_size x max_seq_len
    kv_per_token: int  # bytes per rank per token
    activations: int  # bytes per rank for an eager step of max_num_tokens (logits aside)
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    kv_cache_dtype: str
    capacity: int | None = None  # the target GPU's memory, where known
    logits: int = 0  # bytes: float32 logits of max_batch_size rows and the LM head's chunk
    sampling: int = 0  # bytes: the sampler's workspace at max_batch_size rows
    graphs: int = 0  # bytes: the decode CUDA graphs' shared pool
    free_gpu_memory_fraction: float = DEFAULT_FREE_GPU_MEMORY_FRACTION

    @property
    def workspace(self) -> int:
        """What a step may hold beside weights and the KV pool (the pool is sized after it)."""
        return self.activations + self.logits + self.sampling + self.graphs

    def kv_pool(self, free: int | None = None) -> int | None:
        """KV-pool bytes: the fraction of `free` (the memory free once the weights are loaded; default
        the capacity less the weights and OVERHEAD) left after the workspace."""
        if free is None:
            if self.capacity is None:
                return None
            free = self.capacity - self.weights - OVERHEAD
        return int(max(free - self.workspace, 0) * self.free_gpu_memory_fraction)

    @property
    def minimum(self) -> int:
        """What one max_seq_len request needs."""
        return self.weights + self.workspace + self.kv_per_token * self.max_seq_len + OVERHEAD

    def full_length_sequences(self) -> int | None:
        pool = self.kv_pool()
        return None if pool is None else max(0, pool // max(1, self.kv_per_token * self.max_seq_len))

    def to_dict(self) -> dict:
        return {**asdict(self), "overhead": OVERHEAD, "fits": self.fits(), "kv_pool": self.kv_pool(),
                "full_length_sequences": self.full_length_sequences()}

    def workspace_line(self) -> str:
        """The figures the runtime's load line repeats."""
        return (f"activations {size(self.activations)}, logits {size(self.logits)}, sampling {size(self.sampling)}, "
                f"graphs {size(self.graphs)}")

    def fits(self) -> bool | None:
        return None if self.capacity is None else self.minimum <= self.capacity

    def lines(self) -> list[str]:
        where = f", GPU memory {size(self.capacity)}" if self.capacity else ", GPU memory unknown (--gpu_memory)"
        out = [f"memory plan per rank (tp {self.tp_size}{where}):",
               f"  weights      {size(self.weights):>12}",
               f"  KV cache     {size(self.kv_cache):>12}  at max_batch_size {self.max_batch_size} x max_seq_len "
               f"{self.max_seq_len} ({self.kv_cache_dtype}, {self.kv_per_token / 1024:.1f} KiB per token)",
               f"  activations  {size(self.activations):>12}  at max_num_tokens {self.max_num_tokens}",
               f"  logits       {size(self.logits):>12}  float32, {self.max_batch_size} rows sampled per step",
               f"  sampling     {size(self.sampling):>12}  chunks of {SAMPLING_CHUNK_ROWS} rows",
               f"  graphs       {size(self.graphs):>12}  decode CUDA graphs, one shared pool",
               f"  overhead     {size(OVERHEAD):>12}  CUDA context and workspaces"]
        pool = self.kv_pool()
        if pool is not None:
            n = self.full_length_sequences()
            full = " (all of max_batch_size)" if n >= self.max_batch_size else ""
            out.append(f"  KV pool      {size(pool):>12}  at free_gpu_memory_fraction {self.free_gpu_memory_fraction} "
                       f"of the rest: {pool // max(1, self.kv_per_token)} tokens, {min(n, self.max_batch_size)} "
                       f"sequences of max_seq_len{full}")
        return out

    def check(self) -> None:
        """Raise one line naming the flag to change if one max_seq_len request cannot fit."""
        if self.capacity is None or self.fits():
            return
        have = f"the GPU has {size(self.capacity)}"
        w, act = size(self.weights), size(self.workspace)
        if self.weights + OVERHEAD > self.capacity:
            raise TrtcError(f"the weights need {w} per rank at tp {self.tp_size} (+ {size(OVERHEAD)} overhead) but {have}; "
                            "raise --tp or quantize the weights (--fp8, --int4_awq)")
        if self.weights + self.workspace + OVERHEAD > self.capacity:
            raise TrtcError(f"weights {w} + activations, logits, sampling and graphs {act} at --max_num_tokens "
                            f"{self.max_num_tokens} and --max_batch_size {self.max_batch_size} "
                            f"(+ {size(OVERHEAD)} overhead) do not fit: {have}; lower --max_num_tokens "
                            "(or --max_batch_size)")
        raise TrtcError(f"one sequence of --max_seq_len {self.max_seq_len} needs {size(self.kv_per_token * self.max_seq_len)} "
                        f"of KV cache beside weights {w}, workspace {act} and {size(OVERHEAD)} overhead: {have}; "
                        "lower --max_seq_len (or --kv_cache_dtype fp8)")


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def memory_plan(graph: ModelGraph, mapping: Mapping, dtype: str, quant: QuantConfig | None, config: BuildConfig,
                capacity: int | None = None, free_gpu_memory_fraction: float = DEFAULT_FREE_GPU_MEMORY_FRACTION,
                activation_itemsize: int | None = None, cuda_graphs: bool = True) -> MemoryPlan:
    """config: resolved (BuildConfig.resolved): max_seq_len and kv_cache_dtype decided.
    activation_itemsize: bytes per activation element (default the model dtype's; a CPU runs float32);
    cuda_graphs False: a runtime without decode CUDA graphs (no graph pool)."""
    model_dtype = torch_dtype(dtype)
    shapes = graph.weight_shapes(quant)
    weights = max(
        sum(_numel(shard_for(name, graph, mapping, rank, quant).shape(shape))
            * checkpoint_dtype(name, model_dtype, quant).itemsize for name, shape in shapes.items())
        for rank in range(mapping.tp_size)
    )
    kv_size = kv_cache_torch_dtype(config.kv_cache_dtype).itemsize
    kv_per_token = sum(2 * mapping.local_kv_heads(layer.attention) * layer.attention.head_dim * kv_size
                       for layer in graph.layers)
    act = activation_itemsize or model_dtype.itemsize
    vocab = graph.vocab_size
    local_vocab = mapping.local_vocab(vocab)
    rows = config.max_batch_size
    chunk = min(LOGITS_CHUNK_ROWS, rows)
    # the LM head's chunk (model dtype, and its soft-capped copy) and its gathered float32 copy under tp
    head_chunk = chunk * (2 * local_vocab * act + (mapping.padded_vocab(vocab) * 4 if mapping.tp_size > 1 else 0))
    logits = rows * vocab * 4 + head_chunk + chunk * vocab * 4  # + the top-logprobs chunk's log-softmax
    sampling = (rows * vocab * PENALTY_BYTES_PER_ELEMENT + min(SAMPLING_CHUNK_ROWS, rows) * vocab * SAMPLER_BYTES_PER_ELEMENT
                + rows * -(-vocab // 32) * 4)  # + the guided rows' token bitmasks (int32 words)
    graphs = 0
    if cuda_graphs and config.cuda_graph_batch_sizes:
        bmax = max(config.cuda_graph_batch_sizes)
        graphs = (_activations(graph, mapping, act, None, bmax) + bmax * vocab * 4
                  + min(LOGITS_CHUNK_ROWS, bmax) * 2 * local_vocab * act)
    return MemoryPlan(
        tp_size=mapping.tp_size, weights=weights, kv_cache=kv_per_token * config.max_batch_size * config.max_seq_len,
        kv_per_token=kv_per_token, activations=_activations(graph, mapping, act, quant, config.max_num_tokens),
        max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens,
        kv_cache_dtype=config.kv_cache_dtype, capacity=capacity, logits=logits, sampling=sampling, graphs=graphs,
        free_gpu_memory_fraction=free_gpu_memory_fraction,
    )


MAX_SMS = 160  # streaming multiprocessors of the largest GPU a plan may meet (an H100 SXM has 132)


def decode_split_partials(graph: ModelGraph, mapping: Mapping, tokens: int) -> int:
    """Bytes of decode attention's float32 split partials (out and log-sum-exp) for up to `tokens`
    sequences: splits per (sequence, kv head) aim at 4 programs per SM, so sequences x kv heads x
    splits <= 4 x SMs + sequences x kv heads (triton_decode.num_splits_for)."""
    most = 0
    for layer in graph.layers:
        a = layer.attention
        hq, hkv = mapping.local_heads(a), mapping.local_kv_heads(a)
        most = max(most, (4 * MAX_SMS + tokens * hkv) * (hq // hkv) * (a.head_dim + 1) * 4)
    return most


def _activations(graph: ModelGraph, mapping: Mapping, size: int, quant: QuantConfig | None, tokens: int) -> int:
    """The most bytes a forward of `tokens` tokens holds at once inside a layer (logits aside)."""
    per_token, dequant, tp = 0, 0, mapping.tp_size
    hidden = graph.hidden_size
    for layer in graph.layers:
        a, m = layer.attention, layer.mlp
        hq, hkv = mapping.local_heads(a), mapping.local_kv_heads(a)
        # live through a layer: its input, the residual, the norm's output (and a copy of one of them)
        stream = 4 * hidden
        attention = (hq + 2 * hkv) * a.head_dim + (hq + hkv) * a.head_dim + hq * a.head_dim + hidden
        if m.moe is not None:
            inter = m.intermediate_size // tp
            k = m.moe.top_k
            mlp = k * (3 * inter + 2 * hidden) + m.moe.num_experts + 3 * (m.moe.shared_intermediate_size // tp) + hidden
        else:
            inter = m.intermediate_size // tp
            mlp = 3 * inter + hidden
        per_token = max(per_token, stream + max(attention, mlp))
        if quant is not None and quant.is_int4:
            dequant = max(dequant, 2 * m.intermediate_size // tp * hidden * size)
    return per_token * tokens * size + dequant + decode_split_partials(graph, mapping, tokens)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def capacity(target: dict, gpu_memory: float | None = None) -> int | None:
    """The memory the plan must fit: --gpu_memory GiB, else the target GPU's (present or named)."""
    from trtc.compiler.targets import target_memory_bytes

    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise TrtcError(f"--gpu_memory must be a positive number of GiB, got {gpu_memory}")
        return int(gpu_memory * GIB)
    return target_memory_bytes(target)
