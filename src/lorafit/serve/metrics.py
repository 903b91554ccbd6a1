"""What ``GET /metrics`` reports, in Prometheus' text format (no client library needed).

Counters and histograms are updated from two threads (the event loop: requests and latency; the
model worker: batch sizes, adapter loads and evictions), so every update takes one lock. The
exposition is rendered on demand; nothing is kept per request, so memory stays constant.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """A cumulative-bucket histogram (Prometheus ``_bucket{le=...}``, ``_sum``, ``_count``)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(edge)}"}} {c}' for edge, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {_num(self.total)}", f"{name}_count{braces} {self.n}"]
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    """The server's counters: requests by endpoint and status, latency, batch sizes, adapters."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)
        self.batch_adapters = Histogram(BATCH_BUCKETS)
        self.tokens_generated = 0
        self.loads = 0
        self.load_failures = 0
        self.evictions = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch_run(self, rows: int, distinct_adapters: int) -> None:
        with self.lock:
            self.batch.observe(rows)
            self.batch_adapters.observe(distinct_adapters)

    def count(self, field: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + n)

    def render(self, resident: int, max_resident: int, queued: int) -> str:
        """The exposition text; ``resident`` / ``queued`` are gauges read by the caller."""
        with self.lock:
            out = ["# HELP lorafit_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE lorafit_requests_total counter"]
            out += [f'lorafit_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP lorafit_request_latency_seconds Time from request to response (streams: to the last byte).",
                    "# TYPE lorafit_request_latency_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("lorafit_request_latency_seconds", f'endpoint="{e}"')
            out += ["# HELP lorafit_batch_size Rows per model forward batch (prefill or classification).",
                    "# TYPE lorafit_batch_size histogram", *self.batch.lines("lorafit_batch_size"),
                    "# HELP lorafit_batch_adapters Distinct adapters (base counted as one) per batch.",
                    "# TYPE lorafit_batch_adapters histogram", *self.batch_adapters.lines("lorafit_batch_adapters")]
            scalars = [
                ("lorafit_generated_tokens_total", "counter", "Tokens generated.", self.tokens_generated),
                ("lorafit_adapter_loads_total", "counter", "Adapters loaded from disk.", self.loads),
                ("lorafit_adapter_load_failures_total", "counter", "Adapter loads refused (422).", self.load_failures),
                ("lorafit_adapter_evictions_total", "counter", "Adapters evicted by the LRU.", self.evictions),
            ]
        scalars += [
            ("lorafit_resident_adapters", "gauge", "Adapters loaded in the model now.", resident),
            ("lorafit_max_resident_adapters", "gauge", "--max-resident.", max_resident),
            ("lorafit_queued_requests", "gauge", "Rows waiting for the model worker.", queued),
        ]
        for name, kind, text, value in scalars:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
