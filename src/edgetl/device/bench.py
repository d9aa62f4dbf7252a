"""``edgetl bench``: how fast and how big a bundle is on the machine it runs on (device side, no torch).

It times the bundle's single-file model (backbone + head, what an app calls once per image) on
this host's own kernels (never the exact-INT8 emulation predict may use), and says where it ran:
an NPU or TensorRT profile timed on a machine without one runs on a fallback.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .. import tasks
from ..core.bundle import load_bundle
from ..core.sessions import bundle_session, cpu_family


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM where Linux has it (ru_maxrss survives exec, so
    a process started by a big parent would report the parent's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_bundle(
    path: str | Path,
    *,
    runs: int = 50,
    device: str | None = None,
    batches: tuple[int, ...] = (1, 4, 8, 16, 32),
    samples: bool = False,
) -> dict:
    """Time the bundle's single-file model on inputs its task makes (random images, a typical text).

    Returns latency p50/p90 at batch 1, the best throughput over ``batches`` (only the model's
    static batch when it has one; text runs one text per call, as predict does), the process's
    peak RSS and the sizes.
    """
    b = load_bundle(path)
    task = tasks.for_bundle(b)
    session = bundle_session(b, b.model_file("fused"), device=device, exact=False)  # this host's own kernels

    def once(n: int) -> float:
        x = task.bench_input(b, session, n)
        t0 = time.perf_counter()
        session.run(x)
        return time.perf_counter() - t0

    for _ in range(5):
        once(1)
    lat = np.array([once(1) for _ in range(runs)]) * 1000
    if not session.rows_independent:
        batches = ()
    per_batch = [{"batch": 1, "items_per_s": 1000.0 / float(np.median(lat))}]
    for n in [n for n in ([session.static_batch] if session.static_batch else batches) if n != 1]:
        once(n)
        per_batch.append({"batch": n, "items_per_s": n / min(once(n) for _ in range(3))})
    best = max(per_batch, key=lambda p: p["items_per_s"])
    files = b.manifest["files"]
    backbone = sum(v["bytes"] for k, v in files.items() if k.startswith("backbone"))
    budget = float(b.manifest["target"].get("latency_budget_ms", 0) or 0)
    p50 = float(np.percentile(lat, 50))

    wanted = device or b.manifest["target"].get("device", "CPU")
    # An NPU profile timed on a laptop without an NPU runs on the CPU plugin: the budget is the
    # device's, so the figure says where it really ran.
    fallback = b.runtime == "openvino" and session.device != wanted
    providers = b.manifest["target"].get("providers") or []
    if b.runtime == "onnxruntime" and providers and session.device != providers[0]:
        fallback = True
    return {
        "bundle": str(b.path),
        "task": b.task,
        "precision": b.precision,
        "runtime": b.runtime,
        "device": session.device,
        "target_device": wanted if b.runtime == "openvino" else (providers[0] if providers else "CPUExecutionProvider"),
        "fallback": fallback,
        "float_precision": session.float_precision,
        "requested_float_precision": session.requested_precision,
        "cpu": cpu_family(),
        "latency_ms": {"p50": round(p50, 3), "p90": round(float(np.percentile(lat, 90)), 3)},
        "throughput": {"batch": best["batch"], f"{task.items}_per_s": round(best["items_per_s"], 1)},
        "items": task.items,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "backbone_mb": round(backbone / 1e6, 3),
        "bundle_mb": round(sum(v["bytes"] for v in files.values()) / 1e6, 3),
        "latency_budget_ms": budget,
        "within_budget": bool(budget and p50 <= budget),
        # Every timed run, for a distribution drawn from the same session as the p50 above.
        **(
            {
                "samples_ms": [round(float(v), 4) for v in lat],
                "per_batch": [{"batch": p["batch"], "items_per_s": round(p["items_per_s"], 1)} for p in per_batch],
            }
            if samples
            else {}
        ),
    }
