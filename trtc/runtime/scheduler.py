"""The runtime's scheduler: KV-cache block manager + in-flight batching, implemented in C++
(``trtc._core``, cpp/). Its typed API with the semantics of every call is ``trtc/_core.pyi``,
generated from the bindings (cpp/bindings.cpp) by nanobind's stubgen when trtc is built.

One executor step crosses into C++ twice, with batched data::

    batch = scheduler.schedule()             # ScheduledBatch: numpy arrays for the whole step
    ...                                      # run the model, sample one token per request with batch.sample[i]
    for request_id, token, finish_reason in scheduler.update(tokens):
        ...                                  # stream token; finish_reason is None while generating
"""

from trtc._core import BlockManager, ScheduledBatch, Scheduler

__all__ = ["BlockManager", "ScheduledBatch", "Scheduler"]
