"""Prometheus metrics: vLLM's names with a ``constellation_`` prefix, plus composition metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

P = "constellation_"
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
UNIT = tuple(i / 20 for i in range(1, 21))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge(P + "num_requests_running", "Sequences being decoded", registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests queued for admission", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Between consecutive tokens", buckets=LATENCY,
                             registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY, registry=r)
        self.queue_time = Histogram(P + "request_queue_time_seconds", "Arrival to admission", buckets=LATENCY,
                                    registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", registry=r)
        self.success = Counter(P + "request_success", "Finished sequences", ["finished_reason"], registry=r)
        self.stage = Histogram(P + "composition_seconds", "Per-request composition work by stage", ["stage"],
                               buckets=LATENCY, registry=r)
        # alpha can be negative, so its buckets start below 0 and Prometheus exposes no _sum for it
        # (dashboards use quantiles of the buckets)
        self.alpha = Histogram(P + "domain_alpha", "Per-request alpha by domain", ["domain"],
                               buckets=(-0.5, -0.25, 0) + UNIT, registry=r)
        self.weight = Histogram(P + "domain_weight", "Per-request mean node weight by domain", ["domain"],
                                buckets=(0,) + UNIT, registry=r)
        self.entropy = Histogram(P + "node_entropy_bits", "Per-request mean node entropy",
                                 buckets=(0, 0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3), registry=r)
        self.fallback = Counter(P + "composition_fallback", "Requests with at least one fallback node", registry=r)
        self.batch_size = Histogram(P + "batch_size", "Rows per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.requests_mode = Counter(P + "requests", "Requests by composition mode", ["mode"], registry=r)

    def observe_plan(self, plan, domains: list[str], timings: dict[str, float]) -> None:
        for stage in ("fingerprint", "signature", "weights"):
            if stage in timings:
                self.stage.labels(stage).observe(timings[stage])
        for d, a in zip(domains, plan.alpha):
            self.alpha.labels(d).observe(float(a))
        if plan.node_weights is not None:
            for r, i in enumerate(plan.selected):
                self.weight.labels(domains[i]).observe(float(plan.node_weights[..., r, :].mean()))
            self.entropy.observe(plan.mean_entropy_bits)
        if plan.fallback is not None and bool(plan.fallback.any()):
            self.fallback.inc()

    def compose_time(self, seconds: float) -> None:
        self.stage.labels("compose").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
