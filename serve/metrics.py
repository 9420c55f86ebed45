"""Request metrics of the endpoint, exported through Ray's metrics (Prometheus format).

Recorded by the ingress (``serve/api.py``): every request by path and status with its latency
(status 499 when the client left before any answer),
and every recommendation by how it was obtained — ``generated`` (the model's own answer),
``resampled`` (the model's first answers were items the session had seen: a repeat blocked) or
``fallback`` (the nearest unseen item) — plus grounding substitutions and format errors.
Prometheus sees them as ``ray_ulrec_requests_total{path,status}``,
``ray_ulrec_request_latency_s_bucket{path}``, ``ray_ulrec_recommendations_total{source}``,
``ray_ulrec_substituted_total``, ``ray_ulrec_format_errors_total`` (Serve adds deployment, replica
and application tags); README *Serving* says how to scrape them.
"""

from __future__ import annotations

from typing import Iterable, Protocol

# Latency buckets (s): CPU replicas answer in seconds, GPU ones in tens of milliseconds.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
KNOWN_PATHS = ("/v1/recommend", "/healthz")


def path_label(path: str) -> str:
    """A bounded label: known paths as they are, everything else as ``other``."""
    return path if path in KNOWN_PATHS else "other"


class RequestMetrics(Protocol):
    def request(self, path: str, status: int, latency_s: float) -> None: ...

    def recommendations(self, recs: Iterable) -> None: ...


class NoMetrics:
    """Outside a Serve replica (tests, library use): nothing is exported."""

    def request(self, path: str, status: int, latency_s: float) -> None:
        pass

    def recommendations(self, recs: Iterable) -> None:
        pass


class ServeMetrics:
    """The same records as ``ray.serve.metrics`` counters and a histogram (create it inside the
    replica: Serve's tags come from the replica's context)."""

    def __init__(self, metrics_module=None) -> None:
        if metrics_module is None:
            from ray.serve import metrics as metrics_module
        self._requests = metrics_module.Counter(
            "ulrec_requests", description="HTTP requests by path and status.", tag_keys=("path", "status"))
        self._latency = metrics_module.Histogram(
            "ulrec_request_latency_s", description="Time to the end of the answer (s).",
            boundaries=list(LATENCY_BUCKETS_S), tag_keys=("path",))
        self._recommendations = metrics_module.Counter(
            "ulrec_recommendations", description="Recommendations by source (resampled/fallback: a repeat blocked).",
            tag_keys=("source",))
        self._substituted = metrics_module.Counter(
            "ulrec_substituted", description="Generated titles mapped to their nearest catalogue item.")
        self._format_errors = metrics_module.Counter(
            "ulrec_format_errors", description="Model answers that could not be read.")

    def request(self, path: str, status: int, latency_s: float) -> None:
        label = path_label(path)
        self._requests.inc(1, tags={"path": label, "status": str(status)})
        self._latency.observe(latency_s, tags={"path": label})

    def recommendations(self, recs: Iterable) -> None:
        for rec in recs:
            self._recommendations.inc(1, tags={"source": rec.source})
            if rec.substituted:
                self._substituted.inc(1)
            if rec.format_error:
                self._format_errors.inc(1)
