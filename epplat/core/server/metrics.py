"""Prometheus metrics for /metrics, with vLLM's metric names under the ``epplat:`` prefix.

The prefix cache counters are also exported under vLLM's own names (``vllm:prefix_cache_queries``,
``vllm:prefix_cache_hits``), which dashboards read for the hit rate."""

from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0)
_ITL = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
        40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0)


class Metrics:
    """One app's series, in its own registry (several apps may live in one process)."""

    def __init__(self, model_name: str):
        disable_created_metrics()   # no `*_created` series, as in vLLM (a process-wide prometheus_client setting)
        self.registry = r = CollectorRegistry()
        self.model = model_name
        m = ["model_name"]
        self.success = Counter("epplat:request_success", "Finished requests by finish reason.",
                               m + ["finished_reason"], registry=r).labels
        self.prompt_tokens = Counter("epplat:prompt_tokens", "Prefill tokens processed.", m, registry=r).labels(
            model_name)
        self.generation_tokens = Counter("epplat:generation_tokens", "Generation tokens processed.", m,
                                         registry=r).labels(model_name)
        self.running = Gauge("epplat:num_requests_running", "Requests in the engines' running batches.", m,
                             registry=r).labels(model_name)
        self.waiting = Gauge("epplat:num_requests_waiting", "Requests waiting to be scheduled.", m,
                             registry=r).labels(model_name)
        self.kv_usage = Gauge("epplat:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.", m,
                              registry=r).labels(model_name)
        self.preemptions = Gauge("epplat:num_preemptions_total", "Preemptions since the engines started.", m,
                                 registry=r).labels(model_name)
        self.engine_requests = Gauge("epplat:engine_requests_received", "Requests each DP rank's engine received.",
                                     m + ["dp_rank"], registry=r).labels
        self.eplb_balancedness = Gauge("epplat:eplb_balancedness", "EPLB: mean/max tokens per EP rank, last "
                                       "measured (a window with log_balancedness, or before a rebalance).", m,
                                       registry=r).labels(model_name)
        self.eplb_rebalances = Gauge("epplat:eplb_rebalances", "EPLB rebalances since the engines started.", m,
                                     registry=r).labels(model_name)
        self.prefix_cache = [Counter(f"{ns}:prefix_cache_{what}", f"Prefix cache: prompt tokens {doc}.", m,
                                     registry=r).labels(model_name)
                             for ns in ("epplat", "vllm")
                             for what, doc in (("queries", "looked up"), ("hits", "found cached"))]
        self.spec_decode = [Counter(f"epplat:spec_decode_num_{what}", f"Speculative decoding: {doc}.", m,
                                    registry=r).labels(model_name)
                            for what, doc in (("drafts", "draft proposals"), ("draft_tokens", "draft tokens proposed"),
                                              ("accepted_tokens", "draft tokens accepted"))]
        self.prompt_tokens_computed = Counter(
            "epplat:prompt_tokens_computed", "Prompt tokens whose KV the engines computed (neither found in the "
            "prefix cache nor received through a KV connector).", m, registry=r).labels(model_name)
        self._seen: dict = {}
        self.ttft = Histogram("epplat:time_to_first_token_seconds", "Time to first token in seconds.", m,
                              buckets=_TTFT, registry=r).labels(model_name)
        self.itl = Histogram("epplat:inter_token_latency_seconds", "Time between output tokens in seconds.", m,
                             buckets=_ITL, registry=r).labels(model_name)
        self.tpot = Histogram("epplat:request_time_per_output_token_seconds",
                              "Per request: mean time per output token after the first, in seconds.", m,
                              buckets=_ITL, registry=r).labels(model_name)
        self.e2e = Histogram("epplat:e2e_request_latency_seconds", "End-to-end request latency in seconds.", m,
                             buckets=_E2E, registry=r).labels(model_name)

    def track(self, arrival: float) -> "RequestTracker":
        return RequestTracker(self, arrival)

    def render(self, stats, per_engine: Optional[dict] = None) -> bytes:
        """The text exposition, with the engine gauges set from `stats` (an EngineStats) first."""
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_usage.set(stats.kv_usage)
            self.preemptions.set(stats.num_preemptions)
            q, h = stats.prefix_cache_queries, stats.prefix_cache_hits
            self._advance("prefix", self.prefix_cache, (q, h, q, h))
            self._advance("spec", self.spec_decode,
                          (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens))
            self._advance("computed", [self.prompt_tokens_computed], (stats.num_prompt_tokens_computed,))
        for rank, st in (per_engine or {}).items():
            self.engine_requests(self.model, str(rank)).set(st.num_requests_received)
            if st.eplb_balancedness >= 0:      # the same on every rank: measured over the whole EP group
                self.eplb_balancedness.set(st.eplb_balancedness)
                self.eplb_rebalances.set(st.eplb_rebalances)
        return generate_latest(self.registry)

    def _advance(self, key: str, counters: list, totals: tuple) -> None:
        """The engines report totals; the counters advance by what is new since the last render (an engine
        that restarted from zero adds from zero again)."""
        seen = self._seen.get(key, (0,) * len(totals))
        deltas = [t - s for t, s in zip(totals, seen)] if all(t >= s for t, s in zip(totals, seen)) else totals
        self._seen[key] = totals
        for counter, d in zip(counters, deltas):
            counter.inc(d)


class RequestTracker:
    """Latency and token counts of one engine request, fed as its outputs arrive."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.m, self.arrival = metrics, arrival
        self.first: Optional[float] = None
        self.last = arrival
        self.num_output = 0

    def output(self, num_new_tokens: int) -> None:
        if not num_new_tokens:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.arrival)
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        self.num_output += num_new_tokens

    def finish(self, reason: str, num_prompt_tokens: int) -> None:
        now = time.monotonic()
        self.m.success(self.m.model, reason).inc()
        self.m.prompt_tokens.inc(num_prompt_tokens)
        self.m.generation_tokens.inc(self.num_output)
        self.m.e2e.observe(now - self.arrival)
        if self.first is not None and self.num_output > 1:
            self.m.tpot.observe((self.last - self.first) / (self.num_output - 1))
