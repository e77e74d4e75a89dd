"""Prometheus metrics for /metrics: vLLM's ``vllm:*`` series (names, types, buckets, labels) and epplat's
own ``epplat:*`` ones for what vLLM lacks."""

from __future__ import annotations

import os
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0)
_ITL = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
        40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0)

_ENGINE_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ("epplat:data_parallel_size", "DP engines serving (elastic EP scales change it)."),
    ("epplat:elastic_ep_last_scale_seconds", "Seconds the last elastic EP scale took, request to answer."),
    ("epplat:eplb_balancedness", "EPLB: mean/max tokens per EP rank, last measured (a window with "
                                 "log_balancedness, or before a rebalance)."),
    ("epplat:eplb_rebalances", "EPLB rebalances since the engines started."))
_ENGINE_COUNTERS = (
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts."),
    ("vllm:spec_decode_num_draft_tokens", "Number of spec decoding draft tokens."),
    ("vllm:spec_decode_num_accepted_tokens", "Number of spec decoding accepted tokens."),
    ("epplat:prompt_tokens_computed", "Prompt tokens whose KV the engines computed (neither found in the "
                                      "prefix cache nor received through a KV connector)."))


class EngineSeries(Collector):
    """What the engines report (their load, KV usage, totals, EPLB, the DP size), exposed as this API server
    last read it from them, at each scrape: not counted per API server, so every API server answers the same
    (with --api-server-count > 1, the one a scrape reaches adds it to every server's request series)."""

    def __init__(self, model: str):
        self.model = model
        self.gauges: dict[str, list] = {n: [doc, 0.0] for n, doc in _ENGINE_GAUGES}
        self.counters: dict[str, list] = {n: [doc, 0.0] for n, doc in _ENGINE_COUNTERS}
        self.per_rank: dict[str, float] = {}
        self._seen: dict = {}

    def set(self, name: str, value: float) -> None:
        self.gauges[name][1] = value

    def advance(self, key: str, names: tuple, totals: tuple) -> None:
        """The engines report totals; the counters advance by what is new since the last read (an engine
        that restarted from zero, or a world that lost a rank, adds from zero again)."""
        seen = self._seen.get(key, (0,) * len(totals))
        deltas = [t - s for t, s in zip(totals, seen)] if all(t >= s for t, s in zip(totals, seen)) else totals
        self._seen[key] = totals
        for name, d in zip(names, deltas):
            self.counters[name][1] += d

    def collect(self):
        for family, series in ((GaugeMetricFamily, self.gauges), (CounterMetricFamily, self.counters)):
            for name, (doc, value) in series.items():
                f = family(name, doc, labels=["model_name"])
                f.add_metric([self.model], value)
                yield f
        ranks = GaugeMetricFamily("epplat:engine_requests_received", "Requests each DP rank's engine received.",
                                  labels=["model_name", "dp_rank"])
        for rank, value in self.per_rank.items():
            ranks.add_metric([self.model, rank], value)
        yield ranks


class Metrics:
    """One app's series, in its own registry (several apps may live in one process).

    What vLLM also has takes vLLM's name (``vllm:*``), type and meaning, so that dashboards,
    autoscalers and routers built on vLLM read epplat unchanged; what is epplat's own (EP, EPLB,
    KV connector sources) is ``epplat:*``. The request series count this API server's requests; with
    ``PROMETHEUS_MULTIPROC_DIR`` set (``epplat serve`` sets it for --api-server-count > 1, as vLLM does)
    they live in files there and every API server's /metrics sums all of theirs."""

    def __init__(self, model_name: str):
        disable_created_metrics()   # no `*_created` series, as in vLLM (a process-wide prometheus_client setting)
        self.registry = r = CollectorRegistry()
        self.model = model_name
        m = ["model_name"]

        def counter(name, doc):
            return Counter(name, doc, m, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, m, buckets=buckets, registry=r).labels(model_name)

        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               m + ["finished_reason"], registry=r).labels
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
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
        self.scales = Counter("epplat:elastic_ep_scales", "Elastic EP scales done, by direction (up, down).",
                              m + ["direction"], registry=r).labels
        self.engines = EngineSeries(model_name)
        r.register(self.engines)
        self.exposed = r
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):     # every API server's request series, from their files
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)
            self.exposed.register(self.engines)

    def track(self, arrival: float) -> "RequestTracker":
        return RequestTracker(self, arrival)

    def render(self, stats, per_engine: Optional[dict] = None) -> bytes:
        """The text exposition, with the engine series set from `stats` (an EngineStats) first."""
        e = self.engines
        if stats is not None:
            e.set("vllm:num_requests_running", stats.num_running)
            e.set("vllm:num_requests_waiting", stats.num_waiting)
            e.set("vllm:kv_cache_usage_perc", stats.kv_usage)
            e.advance("preemptions", ("vllm:num_preemptions",), (stats.num_preemptions,))
            e.advance("prefix", ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"),
                      (stats.prefix_cache_queries, stats.prefix_cache_hits))
            e.advance("spec", ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                               "vllm:spec_decode_num_accepted_tokens"),
                      (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens))
            e.advance("computed", ("epplat:prompt_tokens_computed",), (stats.num_prompt_tokens_computed,))
        if per_engine:
            e.set("epplat:data_parallel_size", len(per_engine))      # changes with elastic EP scales
            e.per_rank = {str(rank): st.num_requests_received for rank, st in per_engine.items()}
        for st in (per_engine or {}).values():
            if st.eplb_balancedness >= 0:      # the same on every rank: measured over the whole EP group
                e.set("epplat:eplb_balancedness", st.eplb_balancedness)
                e.set("epplat:eplb_rebalances", st.eplb_rebalances)
        return generate_latest(self.exposed)

    def elastic_scaled(self, old_size: int, new_size: int, seconds: float) -> None:
        self.scales(self.model, "up" if new_size > old_size else "down").inc()
        self.engines.set("epplat:elastic_ep_last_scale_seconds", seconds)
        self.engines.set("epplat:data_parallel_size", new_size)


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
