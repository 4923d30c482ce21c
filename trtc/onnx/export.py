"""Writing the ONNX directory of the tensorrt backend:

    onnx/rank{N}.onnx        the rank's graph (opset 21 + the trtc domain), inspectable in Netron
    onnx/rank{N}.onnx.data   its weights as external data, the engine tensors' bytes in order
    onnx/plugins.json        the trtc-domain ops (inputs, outputs, attributes, aliasing, version),
                             the graph's step inputs, and the files of each rank

Each graph is checked as it is written: `onnx.checker.check_model(full_check=True)` and strict
shape inference, after which every value of the graph has an element type and a shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.checkpoint import CheckpointConfig, torch_dtype
from trtc.formats.rank_tensors import RankTensors
from trtc.onnx.graph_builder import ONNX_TYPE
from trtc.onnx.lower import (
    GRAPH_INPUTS,
    LOGITS,
    POOL_INPUT,
    POOL_OUTPUT,
    RankSpec,
    lower,
)
from trtc.onnx.ops import DOMAIN, DOMAIN_VERSION, OPS
from trtc.version import __version__

OPSET = 21  # ONNX 1.16; TensorRT 10's parser and onnxruntime >= 1.18 read it
IR_VERSION = 10
ALIGN = 64  # bytes: each tensor of the data file starts at a multiple of it
PLUGINS_FILE = "plugins.json"
FORMAT = "trtc-onnx"
FORMAT_VERSION = 1


def onnx_files(rank: int) -> tuple[str, str]:
    return f"rank{rank}.onnx", f"rank{rank}.onnx.data"


def write_onnx_dir(
    out: Path, ckpt: CheckpointConfig, build_config: BuildConfig,
    open_rank: Callable[[int], AbstractContextManager[RankTensors]], dtype: str | None = None,
) -> Path:
    """Lower every rank into `out` (created). dtype: the activations' and model-dtype weights'
    dtype, the checkpoint's by default (float32 makes a graph onnxruntime's CPU kernels run)."""
    out.mkdir(parents=True)
    model_dtype = torch_dtype(ckpt.dtype)
    act = torch_dtype(dtype) if dtype else model_dtype
    used: set[str] = set()
    for rank in range(ckpt.mapping.world_size):
        with open_rank(rank) as source:
            model = write_rank(out, rank, RankSpec(ckpt.graph, ckpt.mapping, rank, build_config, {}, act),
                               source, model_dtype)
        used |= {n.op_type for n in model.graph.node if n.domain == DOMAIN}
        check(out / onnx_files(rank)[0])
    (out / PLUGINS_FILE).write_text(json.dumps(metadata(ckpt.mapping.world_size, act, used), indent=2) + "\n")
    return out


def write_rank(out: Path, rank: int, spec: RankSpec, source: RankTensors, model_dtype: torch.dtype) -> onnx.ModelProto:
    """Stream the rank's tensors into the data file, then write the graph that refers to them."""
    convert = spec.dtype != model_dtype

    def dtype_of(dtype: torch.dtype) -> torch.dtype:
        return spec.dtype if convert and dtype == model_dtype else dtype

    spec.tensors = {name: (dtype_of(dtype), shape) for name, (dtype, shape) in source.shapes().items()}
    graph = lower(spec)
    onnx_name, data_name = onnx_files(rank)
    weights = []
    with open(out / data_name, "wb") as f:
        for name, tensor in source.read():
            tensor = tensor.to(dtype_of(tensor.dtype)).contiguous()
            f.write(b"\0" * (-f.tell() % ALIGN))
            offset, data = f.tell(), tensor.reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            proto = TensorProto(name=name, data_type=ONNX_TYPE[tensor.dtype], dims=list(tensor.shape))
            _refer(proto, data_name, offset, data.nbytes)
            weights.append(proto)
    m = spec.mapping
    model = helper.make_model(
        helper.make_graph(graph.nodes, f"trtc_rank{rank}", graph.inputs, graph.outputs,
                          initializer=weights + graph.initializers, value_info=graph.value_info,
                          doc_string="One trtc runtime step over flattened tokens; see plugins.json."),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        ir_version=IR_VERSION, producer_name="trtc", producer_version=__version__,
    )
    helper.set_model_props(model, {"trtc.rank": str(rank), "trtc.tp_size": str(m.tp_size),
                                   "trtc.architecture": spec.graph.architecture, "trtc.dtype": str(spec.dtype)[6:]})
    onnx.save_model(model, out / onnx_name)
    return model


def _refer(proto: TensorProto, location: str, offset: int, length: int) -> None:
    """Point `proto` at bytes already written to `location` (what external_data_helper's
    set_external_data records, without holding the bytes in the proto first)."""
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        proto.external_data.add(key=key, value=str(value))


def check(path: Path) -> None:
    """The ONNX checker (full) and strict shape inference; then every value must be typed."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise TrtcError(f"the ONNX graph {path} fails the ONNX checker ({str(e).splitlines()[0]}); "
                        "this is a trtc bug, please report it") from None
    g = inferred.graph
    typed = {v.name for v in [*g.input, *g.output, *g.value_info] if _complete(v)} | {t.name for t in g.initializer}
    untyped = [o for n in g.node for o in n.output if o not in typed]
    if untyped:
        raise TrtcError(f"the ONNX graph {path} leaves {untyped[0]} (and {len(untyped) - 1} more) untyped; "
                        "this is a trtc bug, please report it")


def _complete(v: onnx.ValueInfoProto) -> bool:
    t = v.type.tensor_type
    return t.elem_type != TensorProto.UNDEFINED and t.HasField("shape") and all(
        d.HasField("dim_value") or d.HasField("dim_param") for d in t.shape.dim)


def metadata(world_size: int, act: torch.dtype, used: set[str]) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "trtc_version": __version__,
        "opset": OPSET,
        "domain": {"name": DOMAIN, "version": DOMAIN_VERSION},
        "activation_dtype": str(act)[6:],
        "ranks": [dict(zip(("onnx", "data"), onnx_files(r))) for r in range(world_size)],
        "step_inputs": {name: {"dtype": TensorProto.DataType.Name(t), "shape": dims}
                        for name, (t, dims) in GRAPH_INPUTS.items()},
        "kv_cache": {
            "input": POOL_INPUT.format("{layer}"), "output": POOL_OUTPUT.format("{layer}"),
            "shape": "[2, num_blocks, tokens_per_block, local_kv_heads, head_dim]; [0] K, [1] V",
            "contract": "the attention node writes the step's K/V into the pool in place; the output is the "
                        "same buffer (TensorRT plugin I/O aliasing); a runtime binds both names to one buffer",
        },
        "outputs": {LOGITS: "[num_logits, vocab] float32: next-token logits of the tokens at logits_indices"},
        "ops": [OPS[name].to_dict() for name in sorted(used)],
    }
