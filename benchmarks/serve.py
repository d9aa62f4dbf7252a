"""``edgetl serve`` under load on the loopback, against in-process ``predict`` of the same bundle.

    .venv/bin/python benchmarks/serve.py [--work /tmp/serve-bench] [--runs 3] [--requests 60]
                                         [--clients 4] [--json]

What it does, all on one machine, bounded in count (each run sends a fixed number of requests):

* fits (once, cached in ``--work``) the built-in ``surfaces`` example with the CLI;
* **baseline**: ``load_predictor(bundle).predict([image])`` in this process, one image at a time
  (batch 1), the images held as files, as ``edgetl predict`` reads them;
* **service, 1 client**: ``edgetl serve`` (a subprocess, batching on) and one client sending the
  same image bytes one request at a time over a kept-alive HTTP connection: the service's overhead
  at batch 1 is ``1 - service req/s / baseline req/s``, computed per run from a baseline run and a
  service run made back to back (ratios within one run, so machine load drifting between runs
  cancels);
* **service, N clients**, batching on (``--max-batch 8``) and off (``--max-batch 1``): throughput
  and latency percentiles;
* **while adapting**: N clients keep sending while a person's confirmations go through
  ``POST /adapt`` and the new head version goes live: the failed-request count must be 0.

Every figure is the median over ``--runs`` runs with the min..max range; p50 / p99 are per-request
latencies pooled over the runs.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np

TOKEN = "bench-token-0123456789abcdef"


def _cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "edgetl.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgetl {' '.join(map(str, args[:2]))} failed: {r.stderr[-2000:]}")
    return r.stdout


def prepare(work: Path) -> tuple[Path, list[Path]]:
    data, bundle = work / "surfaces", work / "surfaces.bundle"
    if not (data / "example.json").exists():
        _cli("example", "surfaces", data, "--force")
    if not (bundle / "manifest.json").exists():
        _cli("fit", data, "--out", bundle, "--quiet", "--json")
    images = sorted((data / "val").glob("*/*.png"))
    return bundle, images


class Service:
    def __init__(self, bundle: Path, review: Path, *args: str):
        cmd = [
            sys.executable,
            "-m",
            "edgetl.cli",
            "serve",
            str(bundle),
            "--port",
            "0",
            "--json",
            "--no-access-log",
            "--token",
            TOKEN,
            "--review",
            str(review),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.host, self.port = "127.0.0.1", info["port"]
        deadline = time.time() + 60
        while True:
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def request(self, method, path, body=None, headers=None, conn=None):
        c = conn or http.client.HTTPConnection(self.host, self.port, timeout=120)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        out = (r.status, r.read())
        if conn is None:
            c.close()
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def baseline_run(predictor, images: list[Path], n: int) -> dict:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        predictor.predict([images[i % len(images)]])
        lat.append(time.perf_counter() - s)
    return {"rps": n / (time.perf_counter() - t0), "lat": lat, "errors": 0}


def load_run(svc: Service, payloads: list[bytes], n: int, clients: int, during=None) -> dict:
    """``n`` requests from ``clients`` threads (kept-alive connections). With ``during`` (run in
    the main thread once the clients are going), the clients go on until it returned and ``n``
    more requests were answered, so the whole of it runs under load.
    -> req/s, latencies, errors, head versions seen."""
    lat, errors, versions, lock = [], [], set(), threading.Lock()
    done = threading.Event()
    if during is None:
        done.set()
    seq = itertools.count()

    def next_index():
        i = next(seq)  # atomic under the GIL
        return None if (i >= n if during is None else done.is_set()) else i

    def client():
        conn = http.client.HTTPConnection(svc.host, svc.port, timeout=120)
        for i in iter(next_index, None):
            s = time.perf_counter()
            try:
                status, body = svc.request(
                    "POST", "/predict", payloads[i % len(payloads)], {"content-type": "application/octet-stream"}, conn
                )
            except OSError as exc:
                status, body = 0, str(exc).encode()
                conn = http.client.HTTPConnection(svc.host, svc.port, timeout=120)
            dt = time.perf_counter() - s
            with lock:
                lat.append(dt)
                if status != 200:
                    errors.append((status, body[:200]))
                else:
                    versions.add(json.loads(body)["head_version"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    extra = None
    if during is not None:
        extra = during()
        count = len(lat)
        while len(lat) < count + n and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        done.set()
    for t in threads:
        t.join()
    n = len(lat)
    return {
        "rps": n / (time.perf_counter() - t0),
        "lat": lat,
        "errors": len(errors),
        "error_samples": errors[:3],
        "versions": sorted(versions),
        "during": extra,
    }


def summary(runs: list[dict]) -> dict:
    rps = [r["rps"] for r in runs]
    lat = np.concatenate([r["lat"] for r in runs]) * 1000
    return {
        "rps_median": round(float(np.median(rps)), 1),
        "rps_range": [round(min(rps), 1), round(max(rps), 1)],
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "requests": int(len(lat)),
        "errors": int(sum(r["errors"] for r in runs)),
    }


def confirm_items(svc: Service, images: list[Path], classes=("wood", "grass"), per_class: int = 6) -> int:
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    n = 0
    for c in classes:
        for p in [q for q in images if q.parent.name == c][:per_class]:
            pid = json.loads(svc.request("POST", "/predict", p.read_bytes())[1])["id"]
            status, body = svc.request("POST", "/feedback", json.dumps({"id": pid, "label": c}).encode(), auth)
            assert status == 200, body
            n += 1
    return n


def adapt_now(svc: Service) -> dict:
    time.sleep(0.3)
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    t = time.perf_counter()
    status, body = svc.request("POST", "/adapt", b"{}", auth)
    out = json.loads(body)
    return {
        "status": status,
        "accepted": out.get("accepted"),
        "version": out.get("version"),
        "seconds": round(time.perf_counter() - t, 2),
        "error": out.get("error"),
    }


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=60, help="Requests per run at one client.")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    fitted, images = prepare(a.work)
    bundle = a.work / f"run-{time.time_ns()}.bundle"  # a copy: the adapt below must not change the cached one
    shutil.copytree(fitted, bundle)
    try:
        out = measure(a, bundle, images)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    report(a, out)


def measure(a, bundle: Path, images: list[Path]) -> dict:
    payloads = [p.read_bytes() for p in images]
    from edgetl.device.predict import load_predictor

    predictor = load_predictor(bundle)
    for p in images[:5]:
        predictor.predict([p])  # warm-up
    stamp = str(time.time_ns())
    out: dict = {"cpu_count": os.cpu_count(), "images": len(images), "runs": a.runs, "clients": a.clients}

    svc = Service(bundle, a.work / f"review-{stamp}-on", "--max-batch", "8")  # the default
    load_run(svc, payloads, 20, 1)  # warm-up
    base, one, ratios = [], [], []
    for _ in range(a.runs):  # back to back, so each ratio sees the same machine load
        base.append(baseline_run(predictor, images, a.requests))
        one.append(load_run(svc, payloads, a.requests, 1))
        ratios.append(one[-1]["rps"] / base[-1]["rps"])
    out["in_process_batch1"] = summary(base)
    out["service_1_client"] = summary(one)
    out["service_over_in_process"] = {
        "median": round(float(np.median(ratios)), 3),
        "range": [round(min(ratios), 3), round(max(ratios), 3)],
    }
    many = [load_run(svc, payloads, a.requests * 2, a.clients) for _ in range(a.runs)]
    out[f"service_{a.clients}_clients_batching_on"] = summary(many)
    confirm_items(svc, images)
    swap = load_run(svc, payloads, a.requests, a.clients, during=lambda: adapt_now(svc))
    out["while_adapting"] = {**summary([swap]), "adapt": swap["during"], "versions_seen": swap["versions"]}
    svc.stop()

    svc = Service(bundle, a.work / f"review-{stamp}-off", "--max-batch", "1")
    load_run(svc, payloads, 20, 1)
    off = [load_run(svc, payloads, a.requests * 2, a.clients) for _ in range(a.runs)]
    svc.stop()
    out[f"service_{a.clients}_clients_batching_off"] = summary(off)
    on_off = [m["rps"] / f["rps"] for m, f in zip(many, off)]
    out["batching_on_over_off"] = {
        "median": round(float(np.median(on_off)), 3),
        "range": [round(min(on_off), 3), round(max(on_off), 3)],
    }
    return out


def report(a, out: dict) -> None:
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"edgetl serve on the loopback, {out['cpu_count']} CPUs, {a.runs} runs (median, min..max)")
    for key in [k for k in out if k.startswith(("in_process", "service_"))]:
        v = out[key]
        if "rps_median" in v:
            print(
                f"  {key:34s} {v['rps_median']:7.1f} req/s [{v['rps_range'][0]}..{v['rps_range'][1]}]  "
                f"p50 {v['p50_ms']:.1f} ms  p99 {v['p99_ms']:.1f} ms  errors {v['errors']}"
            )
    r = out["service_over_in_process"]
    print(
        f"  service / in-process at batch 1: {r['median']:.3f} [{r['range'][0]}..{r['range'][1]}] "
        f"(overhead {100 * (1 - r['median']):.1f} %)"
    )
    r = out["batching_on_over_off"]
    print(f"  batching on / off, {a.clients} clients: {r['median']:.3f} [{r['range'][0]}..{r['range'][1]}]")
    w = out["while_adapting"]
    print(
        f"  while adapting: {w['requests']} requests, {w['errors']} failed, versions {w['versions_seen']}, "
        f"adapt {w['adapt']}"
    )


if __name__ == "__main__":
    main()
