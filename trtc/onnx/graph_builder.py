"""A thin builder over `onnx.helper`: nodes with readable unique names, small constants, typed
values. The lowering (lower.py) speaks in ops; this keeps the protobuf plumbing out of it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from trtc.onnx.ops import DOMAIN, OPS, PLUGIN_NAMESPACE

ONNX_TYPE = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
    torch.uint8: TensorProto.UINT8,
    torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64,
}

Dims = Sequence[int | str]


class GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []  # small constants, stored in the model
        self.scope = ""
        self._counts: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def _unique(self, base: str) -> str:
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def input(self, name: str, elem_type: int, dims: Dims) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(dims)))
        return name

    def output(self, name: str, elem_type: int, dims: Dims) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(dims)))

    def typed(self, name: str, elem_type: int, dims: Dims) -> str:
        """Declare the type and shape of an intermediate value (outputs of trtc nodes, which ONNX
        shape inference cannot see into)."""
        self.value_info.append(helper.make_tensor_value_info(name, elem_type, list(dims)))
        return name

    def const(self, value: np.ndarray | float | int | Sequence, dtype: np.dtype | str = np.int64,
              elem_type: int | None = None) -> str:
        """A small constant initializer, shared between nodes that ask for the same value. elem_type
        overrides the numpy dtype (bfloat16 constants are made as float32 and converted)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes(), elem_type)
        if key not in self._consts:
            name = self._unique(f"const_{len(self._consts)}")
            if elem_type == TensorProto.BFLOAT16:
                bits = torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
                tensor = helper.make_tensor(name, elem_type, array.shape, bits.tobytes(), raw=True)
            elif elem_type is not None and elem_type != helper.np_dtype_to_tensor_dtype(array.dtype):
                np_type = helper.tensor_dtype_to_np_dtype(elem_type)
                tensor = numpy_helper.from_array(array.astype(np_type), name)
            else:
                tensor = numpy_helper.from_array(array, name)
            self.initializers.append(tensor)
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], num_outputs: int = 1, out_names: Sequence[str] | None = None,
           **attrs) -> str | list[str]:
        """Add a standard ONNX node; returns its output name (or names when num_outputs > 1)."""
        return self._node(op_type, inputs, num_outputs, out_names, "", attrs)

    def trtc_op(self, op_type: str, inputs: Sequence[str], out_names: Sequence[str] | None = None,
                **attrs) -> str | list[str]:
        """Add a node of the trtc domain (ops.py), with the plugin namespace TensorRT's parser reads."""
        spec = OPS[op_type]
        assert len(inputs) == len(spec.inputs) and set(attrs) == {a.name for a in spec.attributes}, op_type
        return self._node(op_type, inputs, len(spec.outputs), out_names, DOMAIN,
                          {**attrs, "plugin_namespace": PLUGIN_NAMESPACE})

    def _node(self, op_type: str, inputs: Sequence[str], num_outputs: int, out_names: Sequence[str] | None,
              domain: str, attrs: dict) -> str | list[str]:
        name = self._unique(f"{self.scope}/{op_type}" if self.scope else op_type)
        outputs = list(out_names) if out_names else [name if num_outputs == 1 else f"{name}:{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if num_outputs == 1 else outputs
