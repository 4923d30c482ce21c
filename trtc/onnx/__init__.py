"""The tensorrt backend's portable half: each rank's layer graph as an ONNX model of standard ops
and `trtc`-domain nodes (ops.py), its weights as external data (export.py, lower.py), and the
trtc nodes' bodies in PyTorch (torch_ops.py: the TensorRT plugins call them; the onnxruntime check
in tests/oracles/ort_runner.py runs them on CPU). Needs the `onnx` extra: pip install 'trtc[onnx]'."""
