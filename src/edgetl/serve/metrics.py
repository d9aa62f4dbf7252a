"""``GET /metrics``: the service's counters in Prometheus' text exposition format (version 0.0.4).

Written here rather than with ``prometheus_client``: a dozen families do not need a dependency on
the device. Rates (unknown, defect and drift rates per second or as a share of predictions) are
what Prometheus computes from the counters, e.g.
``rate(edgetl_unknown_total[5m]) / rate(edgetl_predictions_total[5m])``; the ``recent_*_ratio``
gauges give the same share over the last predictions for a scrape-free look.
"""

from __future__ import annotations

import threading
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request latency buckets (seconds): a few ms for a small backbone up to seconds for an update.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}" if kv else ""


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v

    def lines(self, name: str, **kv) -> list[str]:
        out = [f"{name}_bucket{_labels(**kv, le=_num(float(b)))} {c}" for b, c in zip(self.buckets, self.counts)]
        out.append(f"{name}_bucket{_labels(**kv, le='+Inf')} {self.total}")
        out.append(f"{name}_sum{_labels(**kv)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(**kv)} {self.total}")
        return out


class Metrics:
    """Thread-safe counters of one service (requests, answers, batches, updates)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.batches = _Histogram(BATCH_BUCKETS)
        self.predictions: dict[str, int] = defaultdict(int)
        self.unknown = self.ood = self.defects = self.failed_inputs = 0
        self.updates: dict[tuple, int] = defaultdict(int)
        self.switches = 0

    def request(self, route: str, method: str, code: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, str(code))] += 1
            self.latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def answer(self, result: dict) -> None:
        with self._lock:
            self.predictions[str(result.get("label"))] += 1
            self.unknown += bool(result.get("unknown"))
            self.ood += bool(result.get("ood"))
            self.defects += result.get("verdict") == "defect"

    def failed(self) -> None:
        with self._lock:
            self.failed_inputs += 1

    def batch(self, n: int) -> None:
        with self._lock:
            self.batches.observe(n)

    def update(self, operation: str, outcome: str) -> None:
        with self._lock:
            self.updates[(operation, outcome)] += 1

    def switched(self) -> None:
        with self._lock:
            self.switches += 1

    def render(self, *, task: str, model: str, version: int, queued: int, recent: dict, review: dict | None) -> str:
        """The exposition text; ``recent`` has the shares over the last predictions, ``review``
        the review store's summary (None without one)."""
        from .. import __version__

        L: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            L.append(f"# HELP {name} {help_}")
            L.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("edgetl_info", "gauge", "The service: edgetl version, task and model name (value 1).")
            L.append(f"edgetl_info{_labels(version=__version__, task=task, model=model)} 1")
            family("edgetl_head_version", "gauge", "The head version answering now.")
            L.append(f"edgetl_head_version {version}")
            family(
                "edgetl_head_switches_total",
                "counter",
                "Head versions switched live (adapt, rollback, or a change on disk).",
            )
            L.append(f"edgetl_head_switches_total {self.switches}")
            family("edgetl_requests_total", "counter", "HTTP requests answered, by route, method and status code.")
            for (route, method, code), n in sorted(self.requests.items()):
                L.append(f"edgetl_requests_total{_labels(route=route, method=method, code=code)} {n}")
            family("edgetl_request_duration_seconds", "histogram", "Time from request to response, by route.")
            for route, h in sorted(self.latency.items()):
                L += h.lines("edgetl_request_duration_seconds", route=route)
            family(
                "edgetl_predictions_total",
                "counter",
                "Answers given, by label ('unknown' under the confidence threshold).",
            )
            for label, n in sorted(self.predictions.items()):
                L.append(f"edgetl_predictions_total{_labels(label=label)} {n}")
            family("edgetl_unknown_total", "counter", "Answers under the bundle's confidence threshold.")
            L.append(f"edgetl_unknown_total {self.unknown}")
            family("edgetl_ood_total", "counter", "Inputs flagged as out of distribution (drift).")
            L.append(f"edgetl_ood_total {self.ood}")
            family("edgetl_defects_total", "counter", "Images judged defective.")
            L.append(f"edgetl_defects_total {self.defects}")
            family(
                "edgetl_failed_inputs_total",
                "counter",
                "Inputs that could not be read (not an image, truncated, over the pixel budget).",
            )
            L.append(f"edgetl_failed_inputs_total {self.failed_inputs}")
            family("edgetl_batch_size", "histogram", "Items answered per model call (concurrent requests batched).")
            L += self.batches.lines("edgetl_batch_size")
            family("edgetl_updates_total", "counter", "Updates asked for on this service, by operation and outcome.")
            for (op, outcome), n in sorted(self.updates.items()):
                L.append(f"edgetl_updates_total{_labels(operation=op, outcome=outcome)} {n}")
        family("edgetl_queue_depth", "gauge", "Requests waiting for the inference thread.")
        L.append(f"edgetl_queue_depth {queued}")
        for key, what in (
            ("unknown", "answers under the confidence threshold"),
            ("ood", "inputs out of distribution"),
            ("defect", "images judged defective"),
        ):
            family(
                f"edgetl_recent_{key}_ratio",
                "gauge",
                f"Share of {what} among the last {recent.get('n', 0)} predictions.",
            )
            L.append(f"edgetl_recent_{key}_ratio {_num(float(recent.get(key, 0.0)))}")
        if review is not None:
            family(
                "edgetl_review_items",
                "gauge",
                "Items in the review store, by state (pending: no update has learned from them yet).",
            )
            L.append(f"edgetl_review_items{_labels(state='pending')} {review['pending_total']}")
            L.append(f"edgetl_review_items{_labels(state='used')} {review['used']}")
            family("edgetl_review_bytes", "gauge", "Bytes the review store holds.")
            L.append(f"edgetl_review_bytes {review['bytes']}")
        return "\n".join(L) + "\n"
