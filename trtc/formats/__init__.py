"""What the stages write and read: the layer graph (graph.py) and its tensor-parallel mapping
(mapping.py), the checkpoint (checkpoint.py) with its quantized tensors (quant_layout.py), and the
engine directory (engine.py): its build limits (build_config.py), weights in the kernels' layout
(engine_layout.py, read per rank by rank_tensors.py) and build id (build_id.py)."""
