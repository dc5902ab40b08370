"""Prometheus metrics measured at the API server, under vLLM's names with an `afd:` prefix
(a vLLM dashboard needs only the prefix changed). Served by /metrics (default registry)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
_LATENCY_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 18))
logger = logging.getLogger(__name__)


def _get_or_create(kind: type, name: str, doc: str, labels: list[str], **kw: Any) -> Any:
    # Several apps in one process (tests, aliases) share one registry: reuse a metric that
    # is already registered, if it has our shape; otherwise keep ours unexported rather than
    # fail every request on a label mismatch.
    try:
        return kind(name, doc, labels, **kw)
    except ValueError:
        existing = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001
        if isinstance(existing, kind) and existing._labelnames == tuple(labels):  # noqa: SLF001
            return existing
        logger.warning("metric %s is registered with another shape; not exporting ours", name)
        return kind(name, doc, labels, registry=None, **kw)


class ServerMetrics:
    """Per-request observations, labelled by served model name (label children are bound
    once: `.labels()` costs more than the observation on the per-token path)."""

    def __init__(self, model_name: str, tpot_slo_s: float | None = None) -> None:
        self.model_name = model_name
        # the engine exports afd:num_requests_running (sequences on the ranks); this counts
        # HTTP requests in flight at this server
        self.running = self._one(Gauge, "api_requests_in_flight", "Requests in flight here.")
        self.prompt_tokens = self._one(Counter, "prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = self._one(Counter, "generation_tokens", "Tokens generated.")
        self.tpot = self._hist(
            "request_time_per_output_token_seconds",
            "Mean time per output token of each finished request.",
        )
        self.tpot_slo_s = tpot_slo_s
        self.slo_requests = self._one(
            Counter, "tpot_slo_requests", "Finished requests judged against the TPOT target."
        )
        self.slo_met = self._one(
            Counter, "tpot_slo_met", "Finished requests whose mean TPOT met the target."
        )
        self.ttft = self._hist("time_to_first_token_seconds", "Time to first token.")
        self.itl = self._hist("inter_token_latency_seconds", "Time between outputs.")
        self.e2e = self._hist("e2e_request_latency_seconds", "End-to-end request latency.")
        self.prompt_len = self._hist("request_prompt_tokens", "Prompt tokens.", _TOKEN_BUCKETS)
        self.output_len = self._hist("request_generation_tokens", "Output tokens.", _TOKEN_BUCKETS)
        labels = ["model_name", "finished_reason"]
        self.success = _get_or_create(
            Counter, "afd:request_success", "Finished requests by reason.", labels
        )

    def _one(self, kind: type, name: str, doc: str, **kw: Any) -> Any:
        metric = _get_or_create(kind, f"afd:{name}", doc, ["model_name"], **kw)
        return metric.labels(self.model_name)

    def _hist(self, name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Any:
        return self._one(Histogram, name, doc, buckets=buckets)

    def on_tpot(self, seconds: float) -> None:
        """A finished request's mean time per output token, and whether it met the target."""
        self.tpot.observe(seconds)
        if self.tpot_slo_s is not None:
            self.slo_requests.inc()
            if seconds <= self.tpot_slo_s:
                self.slo_met.inc()

    def on_start(self) -> None:
        self.running.inc()

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_next_output(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_end(self, num_prompt: int, num_output: int, reasons: list[str], seconds: float) -> None:
        self.running.dec()
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_output)
        self.prompt_len.observe(num_prompt)
        self.output_len.observe(num_output)
        self.e2e.observe(seconds)
        for reason in reasons:
            self.success.labels(self.model_name, reason).inc()
