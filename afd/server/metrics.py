"""Prometheus metrics measured at the API server, under vLLM's names so dashboards and
`vllm bench serve` read them unchanged. Exposed by /metrics from the default registry."""

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
    """Per-request observations, labelled by served model name."""

    def __init__(self, model_name: str) -> None:
        labels = ["model_name"]
        self.model_name = model_name
        self.running = _get_or_create(
            Gauge, "vllm:num_requests_running", "Requests in flight at the API server.", labels
        )
        self.prompt_tokens = _get_or_create(
            Counter, "vllm:prompt_tokens", "Prefill tokens processed.", labels
        )
        self.generation_tokens = _get_or_create(
            Counter, "vllm:generation_tokens", "Tokens generated.", labels
        )
        self.success = _get_or_create(
            Counter,
            "vllm:request_success",
            "Finished requests by finish reason.",
            labels + ["finished_reason"],
        )
        self.ttft = self._hist("vllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = self._hist("vllm:inter_token_latency_seconds", "Time between outputs.")
        self.e2e = self._hist("vllm:e2e_request_latency_seconds", "End-to-end request latency.")
        self.prompt_len = self._hist(
            "vllm:request_prompt_tokens", "Prompt length per request.", _TOKEN_BUCKETS
        )
        self.output_len = self._hist(
            "vllm:request_generation_tokens", "Output length per request.", _TOKEN_BUCKETS
        )

    def _hist(self, name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Any:
        return _get_or_create(Histogram, name, doc, ["model_name"], buckets=buckets)

    def on_start(self) -> None:
        self.running.labels(self.model_name).inc()

    def on_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def on_next_output(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def on_end(self, num_prompt: int, num_output: int, reasons: list[str], seconds: float) -> None:
        name = self.model_name
        self.running.labels(name).dec()
        self.prompt_tokens.labels(name).inc(num_prompt)
        self.generation_tokens.labels(name).inc(num_output)
        self.prompt_len.labels(name).observe(num_prompt)
        self.output_len.labels(name).observe(num_output)
        self.e2e.labels(name).observe(seconds)
        for reason in reasons:
            self.success.labels(name, reason).inc()
