"""Prometheus metrics with vLLM's names under the ``epplat:`` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
        2.5)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model = model_name
        self.success = Counter("epplat:request_success", "Finished requests by finish reason",
                               labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("epplat:prompt_tokens", "Prefill tokens processed", labels, registry=r)
        self.generation_tokens = Counter("epplat:generation_tokens", "Tokens generated", labels, registry=r)
        self.running = Gauge("epplat:num_requests_running", "Requests in the engine's running batch", labels,
                             registry=r)
        self.waiting = Gauge("epplat:num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_usage = Gauge("epplat:kv_cache_usage_perc", "KV cache usage (1 = full)", labels, registry=r)
        self.engine_requests = Gauge("epplat:engine_requests_received", "Requests each DP rank's engine received",
                                     labels + ["dp_rank"], registry=r)
        self.preemptions = Gauge("epplat:num_preemptions_total", "Preemptions since start", labels, registry=r)
        self.ttft = Histogram("epplat:time_to_first_token_seconds", "Time to first token", labels, buckets=_TTFT,
                              registry=r)
        self.itl = Histogram("epplat:inter_token_latency_seconds", "Time between output tokens", labels,
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("epplat:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=_TTFT, registry=r)

    def finished(self, reason: str, prompt_tokens: int, output_tokens: int, latency: float) -> None:
        self.success.labels(self.model, reason).inc()
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc(output_tokens)
        self.e2e.labels(self.model).observe(latency)

    def render(self, stats, per_engine: dict | None = None) -> bytes:
        for rank, st in (per_engine or {}).items():
            self.engine_requests.labels(self.model, str(rank)).set(st.num_requests_received)
        self.running.labels(self.model).set(stats.num_running)
        self.waiting.labels(self.model).set(stats.num_waiting)
        self.kv_usage.labels(self.model).set(stats.kv_usage)
        self.preemptions.labels(self.model).set(stats.num_preemptions)
        return generate_latest(self.registry)
