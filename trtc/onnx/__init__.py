"""The tensorrt backend's portable half: each rank's layer graph as an ONNX model of standard ops
and `trtc`-domain nodes (ops.py), its weights as external data (export.py, lower.py), and the
onnxruntime check that runs it on CPU with the trtc nodes' reference implementations
(ort_runner.py). Needs the `onnx` extra: pip install 'trtc[onnx]'."""
