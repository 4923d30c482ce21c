"""Prometheus metrics with vLLM's names under the `trtc:` prefix (so vLLM dashboards carry over).

Scheduler state (running / waiting requests, KV-cache usage, preemptions, prefix-cache queries and
hits) is read at scrape time from the statistics the engine thread publishes after each step; the
per-request counters and histograms are recorded when a request ends. With several API server
processes (`trtc serve --api_server_count N`, PROMETHEUS_MULTIPROC_DIR set before prometheus_client
is imported), each process records into that folder and a scrape of any of them sums them all
(prometheus_client's multiprocess mode, as vLLM's API servers do).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from trtc.runtime.request_stream import RequestStream

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort")


class EngineCollector:
    """Gauges and cumulative counters from the engine thread's last published EngineStats."""

    def __init__(self, get_stats, model_name: str) -> None:
        self.get_stats, self.labels = get_stats, {"model_name": model_name}

    def collect(self):
        s = self.get_stats()
        for name, doc, value, kind in [
            ("num_requests_running", "Requests in the running batch.", s.num_running, GaugeMetricFamily),
            ("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting, GaugeMetricFamily),
            ("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent of the blocks in use.", s.kv_cache_usage,
             GaugeMetricFamily),
            ("num_preemptions", "Preemptions by the scheduler.", s.num_preemptions, CounterMetricFamily),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries,
             CounterMetricFamily),
            ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hits,
             CounterMetricFamily),
            ("engine_dead", "1 once the engine stopped on a broken device (restart the server).", int(s.engine_dead),
             GaugeMetricFamily),
            ("engine_steps", "Engine steps that ran a batch.", s.num_steps, CounterMetricFamily),
            ("engine_graph_steps", "Of them, decode-only steps replayed from a CUDA graph (the rest ran eagerly).",
             s.num_graph_steps, CounterMetricFamily),
            ("spec_decode_num_drafts", "Speculative decoding: request-steps that fed draft tokens.", s.spec_num_drafts,
             CounterMetricFamily),
            ("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens fed.", s.spec_num_draft_tokens,
             CounterMetricFamily),
            ("spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens the target kept.",
             s.spec_num_accepted_tokens, CounterMetricFamily),
        ]:
            metric = kind(f"trtc:{name}", doc, labels=list(self.labels))
            metric.add_metric(list(self.labels.values()), value)
            yield metric


class ServerMetrics:
    def __init__(self, get_stats, model_name: str) -> None:
        disable_created_metrics()  # no *_created series (vLLM's choice too)
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(get_stats, model_name))
        labels, reg = ["model_name"], self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the values live in the folder: a scrape reads them all
            MultiProcessCollector(self.registry)
            reg = None
        self.prompt_tokens = Counter("trtc:prompt_tokens", "Prefill tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter("trtc:generation_tokens", "Generation tokens produced.", labels,
                                         registry=reg)
        self.request_success = Counter("trtc:request_success", "Finished requests by finish reason.",
                                       [*labels, "finished_reason"], registry=reg)
        self.ttft = Histogram("trtc:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("trtc:inter_token_latency_seconds", "Time between consecutive output tokens.", labels,
                             buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("trtc:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=E2E_BUCKETS, registry=reg)
        self.queue_time = Histogram("trtc:request_queue_time_seconds",
                                    "Arrival to the start of the step that produced the first token.", labels,
                                    buckets=E2E_BUCKETS, registry=reg)
        self.model_name = model_name
        for reason in FINISH_REASONS:  # present at 0 from the start, as dashboards expect
            self.request_success.labels(model_name, reason)
        self._prompt, self._generation = self.prompt_tokens.labels(model_name), self.generation_tokens.labels(model_name)
        self._ttft, self._itl = self.ttft.labels(model_name), self.itl.labels(model_name)
        self._e2e, self._queue = self.e2e.labels(model_name), self.queue_time.labels(model_name)

    def record(self, stream: RequestStream, finish_reason: str) -> None:
        """A request ended (finish_reason: stop | length | abort)."""
        t, out = stream.times, stream.output
        self._prompt.inc(len(out.prompt_token_ids))
        self._generation.inc(len(out.outputs[0].token_ids))
        self.request_success.labels(self.model_name, finish_reason).inc()
        if t.token_times:
            self._ttft.observe(t.token_times[0] - t.arrival)
            self._queue.observe(max(0.0, t.first_step - t.arrival))
            observe = self._itl.observe
            for a, b in zip(t.token_times, t.token_times[1:]):
                observe(b - a)
        self._e2e.observe((t.finished or t.arrival) - t.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
