"""What a benchmark's figures were measured on: the date, the CPU and its INT8-relevant features,
the load, and the versions of the numerics stack. Printed on stderr at the start of every benchmark
so a table pasted into docs/BENCHMARKS.md carries its conditions (pin the stack with
``pip install -c constraints/bench.txt ...`` to compare runs)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

# The packages whose versions change the numbers: kernels, quantizers, exporters.
STACK = ("numpy", "onnxruntime", "openvino", "nncf", "onnx", "torch", "timm", "Pillow", "transformers", "optimum-onnx")
# CPU features that change INT8 and float arithmetic (saturating u8 x s8 sums without VNNI; bf16 defaults).
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp", "i8mm")


def _cpu() -> tuple[str, list[str]]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = set(
        next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith(("flags", "Features"))), [])
    )
    return model or platform.machine(), [f for f in FEATURES if f in flags]


def versions() -> dict[str, str]:
    out = {}
    for name in STACK:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe() -> dict:
    model, flags = _cpu()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": model,
        "cpu_features": flags,
        "cores": os.cpu_count(),
        "load_1min": round(load, 1) if load is not None else None,
        "python": platform.python_version(),
        "versions": versions(),
    }


def stamp() -> dict:
    """Print the conditions on stderr (stdout stays the benchmark's own output) and return them."""
    d = describe()
    stack = ", ".join(f"{k} {v}" for k, v in d["versions"].items())
    print(
        f"# {d['date']} | {d['cpu']} ({' '.join(d['cpu_features']) or 'no listed INT8/bf16 features'}), "
        f"{d['cores']} cores, load {d['load_1min']} | Python {d['python']} | {stack}",
        file=sys.stderr,
    )
    return d
