"""Tensor parallelism's plumbing: who is which rank (launch.py), process groups and collectives
(distributed.py), rank 0's step message (step.py). Above it, trtc/runtime/worker.py is one rank's
share of the model and the other ranks' loop, and trtc/runtime/ranks.py is rank 0 starting the
ranks and reporting their failures."""
