"""Prometheus metrics for /metrics: vLLM's ``vllm:*`` series (names, types, buckets, labels) and epplat's
own ``epplat:*`` ones for what vLLM lacks."""

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
    """One app's series, in its own registry (several apps may live in one process).

    What vLLM also has takes vLLM's name (``vllm:*``), type and meaning, so that dashboards,
    autoscalers and routers built on vLLM read epplat unchanged; what is epplat's own (EP, EPLB,
    KV connector sources) is ``epplat:*``."""

    def __init__(self, model_name: str):
        disable_created_metrics()   # no `*_created` series, as in vLLM (a process-wide prometheus_client setting)
        self.registry = r = CollectorRegistry()
        self.model = model_name
        m = ["model_name"]

        def counter(name, doc):
            return Counter(name, doc, m, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, m, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               m + ["finished_reason"], registry=r).labels
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prefix_cache = [counter(f"vllm:prefix_cache_{what}", f"Prefix cache {what}, in terms of number of "
                                     f"{doc} tokens.") for what, doc in (("queries", "queried"), ("hits", "cached"))]
        self.spec_decode = [counter(f"vllm:spec_decode_num_{what}", f"Number of spec decoding {doc}.")
                            for what, doc in (("drafts", "drafts"), ("draft_tokens", "draft tokens"),
                                              ("accepted_tokens", "accepted tokens"))]
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", _ITL)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", _E2E)
        self.phases = [histogram(f"vllm:request_{what}_time_seconds", f"Histogram of time spent in {doc} phase "
                                 "for request.", _E2E)
                       for what, doc in (("queue", "WAITING"), ("prefill", "PREFILL"), ("decode", "DECODE"),
                                         ("inference", "RUNNING"))]
        self.engine_requests_family = Gauge("epplat:engine_requests_received",
                                            "Requests each DP rank's engine received.", m + ["dp_rank"], registry=r)
        self.engine_requests = self.engine_requests_family.labels
        self._ranks: set = set()
        self.dp_size = gauge("epplat:data_parallel_size", "DP engines serving (elastic EP scales change it).")
        self.scales = Counter("epplat:elastic_ep_scales", "Elastic EP scales done, by direction (up, down).",
                              m + ["direction"], registry=r).labels
        self.last_scale_seconds = gauge("epplat:elastic_ep_last_scale_seconds",
                                        "Seconds the last elastic EP scale took, request to answer.")
        self.eplb_balancedness = gauge("epplat:eplb_balancedness", "EPLB: mean/max tokens per EP rank, last "
                                       "measured (a window with log_balancedness, or before a rebalance).")
        self.eplb_rebalances = gauge("epplat:eplb_rebalances", "EPLB rebalances since the engines started.")
        self.prompt_tokens_computed = counter(
            "epplat:prompt_tokens_computed", "Prompt tokens whose KV the engines computed (neither found in the "
            "prefix cache nor received through a KV connector).")
        self._seen: dict = {}

    def track(self, arrival: float) -> "RequestTracker":
        return RequestTracker(self, arrival)

    def render(self, stats, per_engine: Optional[dict] = None) -> bytes:
        """The text exposition, with the engine gauges set from `stats` (an EngineStats) first."""
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.kv_usage.set(stats.kv_usage)
            self._advance("preemptions", [self.preemptions], (stats.num_preemptions,))
            self._advance("prefix", self.prefix_cache, (stats.prefix_cache_queries, stats.prefix_cache_hits))
            self._advance("spec", self.spec_decode,
                          (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens))
            self._advance("computed", [self.prompt_tokens_computed], (stats.num_prompt_tokens_computed,))
        if per_engine:
            self.dp_size.set(len(per_engine))      # changes with elastic EP scales
            for rank in self._ranks - set(per_engine):
                self.engine_requests_family.remove(self.model, str(rank))
            self._ranks = set(per_engine)
        for rank, st in (per_engine or {}).items():
            self.engine_requests(self.model, str(rank)).set(st.num_requests_received)
            if st.eplb_balancedness >= 0:      # the same on every rank: measured over the whole EP group
                self.eplb_balancedness.set(st.eplb_balancedness)
                self.eplb_rebalances.set(st.eplb_rebalances)
        return generate_latest(self.registry)

    def elastic_scaled(self, old_size: int, new_size: int, seconds: float) -> None:
        self.scales(self.model, "up" if new_size > old_size else "down").inc()
        self.last_scale_seconds.set(seconds)
        self.dp_size.set(new_size)

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

    def output(self, num_new_tokens: int, step_times: list[float]) -> None:
        """A delta of `num_new_tokens` tokens, from engine steps whose tokens arrived at `step_times`
        (several when the consumer fell behind and their outputs were merged): one TTFT or ITL each, as in
        vLLM, where they are measured per engine output."""
        for t in step_times:
            if self.first is None:
                self.first = t
                self.m.ttft.observe(t - self.arrival)
            else:
                self.m.itl.observe(t - self.last)
            self.last = t
        self.num_output += num_new_tokens

    def finish(self, reason: str, num_prompt_tokens: int, times=None) -> None:
        """The request ended; `times` is the engine's RequestTimes (None when it never ran there)."""
        now = time.monotonic()
        self.m.success(self.m.model, reason).inc()
        self.m.prompt_tokens.inc(num_prompt_tokens)
        self.m.generation_tokens.inc(self.num_output)
        self.m.e2e.observe(now - self.arrival)
        if self.first is not None and self.num_output > 1:
            self.m.tpot.observe((self.last - self.first) / (self.num_output - 1))
        if times is not None:
            queue, prefill, decode, inference = self.m.phases
            queue.observe(times.queue)
            prefill.observe(times.prefill)
            decode.observe(times.decode)
            inference.observe(times.prefill + times.decode)
