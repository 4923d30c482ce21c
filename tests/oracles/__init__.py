"""Test oracles: the oracle forward over the checkpoint (reference.py), the Python twin of the C++
scheduler (py_scheduler.py) and the onnxruntime check of the tensorrt backend's graphs
(ort_runner.py). Tests and benchmarks use them; the package does not."""
