"""The ONNX graphs of the tensorrt backend: their contract (inputs, outputs, KV-cache pools, the
trtc nodes and their metadata), their types (bf16, FP8), the checks they pass, determinism."""

from __future__ import annotations

import json

import onnx
import pytest
from models import make_hf_model
from onnx import TensorProto, helper
from quantized_checkpoints import quantize_checkpoint

from trtc.converters.convert import convert
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.checkpoint import CheckpointConfig
from trtc.formats.rank_tensors import checkpoint_rank
from trtc.onnx.export import ALIGN, check, write_onnx_dir

LIMITS = BuildConfig(tokens_per_block=4, max_seq_len=64, max_num_tokens=24, max_batch_size=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_graph")
    hf = make_hf_model(root / "hf", "llama3_gqa", hidden_size=128, intermediate_size=256)
    return {
        "float32": convert(hf, root / "fp32", progress=False),
        "bfloat16": convert(hf, root / "bf16", dtype="bfloat16", progress=False),
        "tp2": convert(hf, root / "tp2", tp_size=2, progress=False),
        "fp8_kv_bf16": quantize_checkpoint(convert(hf, root / "bf16b", dtype="bfloat16", progress=False),
                                           root / "fp8", "FP8", kv_fp8=True),
        "int4": quantize_checkpoint(root / "fp32", root / "int4", "W4A16_AWQ"),
    }


def export(ckpt_dir, out, dtype=None):
    cfg = CheckpointConfig.load(ckpt_dir)
    write_onnx_dir(out, cfg, LIMITS.resolved(cfg.graph, cfg.dtype, cfg.quantization),
                   lambda rank: checkpoint_rank(ckpt_dir, rank, cfg.graph), dtype)
    return out


def load(path):
    return onnx.load(str(path), load_external_data=False)


def types(model) -> dict[str, tuple[int, list]]:
    g = model.graph
    return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*g.input, *g.output, *g.value_info]}


def test_graph_contract(checkpoints, tmp_path):
    out = export(checkpoints["float32"], tmp_path / "onnx")
    model = load(out / "rank0.onnx")
    t = types(model)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 21), ("trtc", 1)}
    assert t["input_ids"] == (TensorProto.INT64, ["num_tokens"])
    assert t["block_tables"] == (TensorProto.INT32, ["num_seqs", "max_blocks_per_seq"])
    assert t["query_start_loc"] == (TensorProto.INT32, ["num_seqs_plus_one"])
    assert t["logits"] == (TensorProto.FLOAT, ["num_logits", 131])
    for i in range(2):  # per layer: K and V stacked, updated pool as an output of the same shape
        assert t[f"kv_cache_pool.{i}"] == t[f"present_kv_cache_pool.{i}"] == (TensorProto.FLOAT, [2, "num_blocks", 4, 2, 32])
    attention = [n for n in model.graph.node if n.op_type == "PagedAttention"]
    assert len(attention) == 2 and all(n.domain == "trtc" for n in attention)
    attrs = {a.name: helper.get_attribute_value(a) for a in attention[0].attribute}
    assert attrs["plugin_namespace"] == b"trtc" and attrs["num_heads"] == 4 and attrs["num_kv_heads"] == 2
    assert attention[0].input[3] == "kv_cache_pool.0" and attention[0].output[1] == "present_kv_cache_pool.0"
    assert {n.op_type for n in model.graph.node if n.domain == "trtc"} == {"PagedAttention"}  # no quantized GEMMs
    # every weight is external data in rank0.onnx.data, aligned, named as in the engine (fused qkv)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data}
    assert "layers.0.attention.qkv.weight" in external and "layers.0.mlp.gate_up.weight" in external
    assert all(e["location"] == "rank0.onnx.data" and int(e["offset"]) % ALIGN == 0 for e in external.values())
    end = max(int(e["offset"]) + int(e["length"]) for e in external.values())
    assert (out / "rank0.onnx.data").stat().st_size == end
    meta = json.loads((out / "plugins.json").read_text())
    assert [op["name"] for op in meta["ops"]] == ["PagedAttention"]
    op = meta["ops"][0]
    assert op["plugin_id"] == "trtc::PagedAttention" and op["aliases"] == {"1": 3} and op["version"] == 1
    assert [p["name"] for p in op["inputs"]] == ["qkv", "rope_cos", "rope_sin", "kv_cache_pool", "k_scale", "v_scale",
                                                 "slot_mapping", "block_tables", "context_lens", "query_start_loc"]
    assert meta["ranks"] == [{"onnx": "rank0.onnx", "data": "rank0.onnx.data"}]


def test_bf16_and_fp8_types(checkpoints, tmp_path):
    """A bf16 model's graph computes in BFLOAT16; FP8 weights and pools are FLOAT8E4M3FN."""
    model = load(export(checkpoints["bfloat16"], tmp_path / "bf16") / "rank0.onnx")
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["layers.0.attention.qkv.weight"] == TensorProto.BFLOAT16
    assert types(model)["layers.0.attention.out"][0] == TensorProto.BFLOAT16
    assert types(model)["kv_cache_pool.0"][0] == TensorProto.BFLOAT16
    model = load(export(checkpoints["fp8_kv_bf16"], tmp_path / "fp8") / "rank0.onnx")
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["layers.0.attention.qkv.weight"] == TensorProto.FLOAT8E4M3FN
    assert weights["layers.0.attention.k_cache_scale"] == TensorProto.FLOAT
    assert types(model)["kv_cache_pool.1"][0] == TensorProto.FLOAT8E4M3FN
    gemm = next(n for n in model.graph.node if n.op_type == "Fp8Gemm")
    assert gemm.domain == "trtc" and gemm.input[1] == "layers.0.attention.qkv.weight"
    attention = next(n for n in model.graph.node if n.op_type == "PagedAttention")
    assert list(attention.input[4:6]) == ["layers.0.attention.k_cache_scale", "layers.0.attention.v_cache_scale"]


def test_int4_graph(checkpoints, tmp_path):
    model = load(export(checkpoints["int4"], tmp_path / "int4") / "rank0.onnx")
    gemms = [n for n in model.graph.node if n.op_type == "W4A16Gemm"]
    assert len(gemms) == 2 * 4  # qkv, o, gate_up, down per layer
    assert helper.get_attribute_value(next(a for a in gemms[0].attribute if a.name == "group_size")) == 32
    # AWQ's pre-quant scale of o is a Mul before its GEMM
    o = next(n for n in gemms if n.input[1] == "layers.0.attention.o.weight")
    producer = next(n for n in model.graph.node if o.input[0] in n.output)
    assert producer.op_type == "Mul"


def test_tensor_parallel_graph_has_collectives(checkpoints, tmp_path):
    out = export(checkpoints["tp2"], tmp_path / "tp2")
    for rank in range(2):
        model = load(out / f"rank{rank}.onnx")
        ops = [n for n in model.graph.node if n.domain == "trtc"]
        reduce = [n for n in ops if n.op_type == "AllReduce"]
        assert len(reduce) == 1 + 2 * 2  # embedding, then o and down of each layer
        assert {helper.get_attribute_value(a) for n in reduce for a in n.attribute if a.name == "rank"} == {rank}
        assert [n.op_type for n in ops].count("AllGather") == 1
        assert types(model)["kv_cache_pool.0"][1] == [2, "num_blocks", 4, 1, 32]  # one of the 2 KV heads


def test_lowering_is_deterministic(checkpoints, tmp_path):
    a, b = export(checkpoints["fp8_kv_bf16"], tmp_path / "a"), export(checkpoints["fp8_kv_bf16"], tmp_path / "b")
    for name in ("rank0.onnx", "rank0.onnx.data", "plugins.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_check_rejects_a_broken_graph(checkpoints, tmp_path):
    """The checks can fail: an attention output left untyped, and a node of an unknown standard op."""
    out = export(checkpoints["float32"], tmp_path / "onnx")
    model = load(out / "rank0.onnx")
    del model.graph.value_info[:]
    onnx.save(model, out / "untyped.onnx")
    with pytest.raises(TrtcError, match="untyped"):
        check(out / "untyped.onnx")
    model = load(out / "rank0.onnx")
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save(model, out / "bad.onnx")
    with pytest.raises(TrtcError, match="ONNX checker"):
        check(out / "bad.onnx")
