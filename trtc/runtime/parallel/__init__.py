"""Tensor parallelism: who is which rank (launch.py), process groups and collectives
(distributed.py), rank 0's step message (step.py), one rank's share and the other ranks' loop
(worker.py), rank 0 starting the ranks and reporting their failures (ranks.py)."""
