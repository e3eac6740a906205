"""Prometheus metrics: vLLM's names with a ``constellation_`` prefix, plus composition metrics.

Every series carries ``model_name`` (the served model name, as vLLM labels its series), so one
Prometheus can scrape several servers and a vLLM dashboard ports by renaming ``vllm:`` to
``constellation_`` (docs/server.md, "Metrics", has the mapping). Finished sequences are counted by
``finished_reason``: ``stop``, ``length``, or ``abort`` (the client went away), vLLM's values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

P = "constellation_"
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
UNIT = tuple(i / 20 for i in range(1, 21))


class _Labelled:
    """A metric with ``model_name`` first: ``.labels(x)`` fills the model name and then ``x``."""

    def __init__(self, metric, model_name: str):
        self.metric, self.model_name = metric, model_name

    def labels(self, *values: str):
        return self.metric.labels(self.model_name, *values)


class Metrics:
    def __init__(self, model_name: str = "constellation") -> None:
        r = self.registry = CollectorRegistry()
        m = ["model_name"]

        def one(kind, name, doc, **kw):  # a series with only the model name: its child
            return kind(P + name, doc, m, registry=r, **kw).labels(model_name)

        def per(kind, name, doc, label, **kw):  # a family by ``label``, model name filled in
            return _Labelled(kind(P + name, doc, m + [label], registry=r, **kw), model_name)

        self.running = one(Gauge, "num_requests_running", "Sequences being decoded")
        self.waiting = one(Gauge, "num_requests_waiting", "Requests queued for admission")
        self.ttft = one(Histogram, "time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY)
        self.itl = one(Histogram, "inter_token_latency_seconds", "Between consecutive tokens", buckets=LATENCY)
        self.e2e = one(Histogram, "e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY)
        self.queue_time = one(Histogram, "request_queue_time_seconds", "Arrival to admission", buckets=LATENCY)
        self.prompt_tokens = one(Counter, "prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = one(Counter, "generation_tokens", "Tokens generated")
        self.success = per(Counter, "request_success", "Finished sequences (stop, length, abort)", "finished_reason")
        self.stage = per(Histogram, "composition_seconds", "Per-request composition work by stage", "stage",
                         buckets=LATENCY)
        # alpha can be negative, so its buckets start below 0 and Prometheus exposes no _sum for it
        # (dashboards use quantiles of the buckets)
        self.alpha = per(Histogram, "domain_alpha", "Per-request alpha by domain", "domain",
                         buckets=(-0.5, -0.25, 0) + UNIT)
        self.weight = per(Histogram, "domain_weight", "Per-request mean node weight by domain", "domain",
                          buckets=(0,) + UNIT)
        self.entropy = one(Histogram, "node_entropy_bits", "Per-request composition entropy (bits)",
                           buckets=(0, 0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3))
        self.fallback = one(Counter, "composition_fallback", "Requests with at least one fallback node")
        self.batch_size = one(Histogram, "batch_size", "Rows per decode step",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.kv_usage = one(Gauge, "kv_cache_usage_perc", "Share of the KV cache's positions held by slots (0-1)")
        self.preemptions = one(Counter, "num_preemptions", "Sequences preempted (KV freed, recomputed later)")
        self.requests_mode = per(Counter, "requests", "Requests by composition mode", "mode")
        self.catalog_version = one(Gauge, "catalog_version", "The specialists' catalog being served (new requests)")
        self.grammars_compiled = one(Counter, "grammars_compiled", "Grammars compiled (response_format, tools): "
                                     "cache misses of the compiled-grammar cache")

    def observe_plan(self, plan, domains: list[str], timings: dict[str, float]) -> None:
        for stage in ("fingerprint", "signature", "weights"):
            if stage in timings:
                self.stage.labels(stage).observe(timings[stage])
        for d, a in zip(domains, plan.alpha):
            self.alpha.labels(d).observe(float(a))
        if plan.node_weights is not None:
            for r, i in enumerate(plan.selected):
                self.weight.labels(domains[i]).observe(float(plan.node_weights[..., r, :].mean()))
        if plan.node_weights is not None or plan.specialist_weights is not None:  # (not the generalist alone)
            self.entropy.observe(plan.mean_entropy_bits)
        if plan.fallback is not None and bool(plan.fallback.any()):
            self.fallback.inc()

    def compose_time(self, seconds: float) -> None:
        self.stage.labels("compose").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
