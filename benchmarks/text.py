"""Text bundles: sentences/s FP32 vs INT8 (same runtime, one run), encoder size, accuracy drop.

Builds the tickets example, fits an INT8 text bundle for the chosen runtime (the accuracy gate's
own figures: FP32 vs INT8 validation accuracy on held-out templates, embedding cosine), then
times the FP32 and the INT8 encoder on the same texts in the same runtime, alternating A/B
rounds so that load from other processes on a shared machine hits both alike. Usage:

    .venv/bin/python benchmarks/text.py [--runtime onnxruntime|openvino] [--batch 32] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np


def _rate(encoder, texts: list[str], batch: int) -> float:
    """Sentences per second for one pass over ``texts`` in batches of ``batch`` (no cache)."""
    t0 = time.perf_counter()
    for start in range(0, len(texts), batch):
        encoder.embed_batch(texts[start : start + batch])
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime")
    ap.add_argument("--batch", type=int, default=32, help="texts per runtime call for throughput")
    ap.add_argument("--rounds", type=int, default=5, help="alternating FP32 / INT8 timing rounds")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--cache", help="edgetl cache directory (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgetl.core.sessions import default_threads
    from edgetl.core.targets import load_target
    from edgetl.datasets.tickets import make_tickets
    from edgetl.export.text import export_text_backbone
    from edgetl.tasks.text.data import load_text_dataset
    from edgetl.tasks.text.encoder import TextEncoder
    from edgetl.text import TextFitOptions, _converted_text_model, fit_text

    target_name = "cpu-x86" if args.runtime == "onnxruntime" else "openvino-cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(args.cache) if args.cache else tmp / "cache"
        make_tickets(tmp / "data", seed=0, per_class=args.per_class, val_per_class=args.per_class // 3)
        data = tmp / "data" / "tickets.csv"
        t0 = time.perf_counter()
        result = fit_text(
            data,
            tmp / "int8.bundle",
            options=TextFitOptions(target=target_name, cache_dir=str(cache), quiet=True, allow_drop=True),
        )
        fit_s = time.perf_counter() - t0
        exported = export_text_backbone(cache_dir=cache)
        fp32_target = dataclasses.replace(load_target(target_name), precision="fp32")
        fp32_model = _converted_text_model(exported, fp32_target, [], cache, "auto")
        b = result.bundle
        int8 = TextEncoder(
            b.model_file("backbone"), b.file("tokenizer.json"), runtime=args.runtime, max_length=exported.max_length
        )
        fp32 = TextEncoder(fp32_model.path, exported.tokenizer, runtime=args.runtime, max_length=exported.max_length)

        ds = load_text_dataset(data)
        texts = [s.text for s in ds.val + ds.train][:256]
        for enc in (fp32, int8):  # warm-up: first calls allocate and pick kernels
            _rate(enc, texts[: 2 * args.batch], args.batch)
        load_before = os.getloadavg()[0]
        rates: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(args.rounds):
            rates["fp32"].append(_rate(fp32, texts, args.batch))
            rates["int8"].append(_rate(int8, texts, args.batch))
        single = {
            name: float(np.median([_rate(enc, texts[:48], 1) for _ in range(2)]))
            for name, enc in (("fp32", fp32), ("int8", int8))
        }

        r = result.report
        ref = r["reference"]
        fp32_bytes = sum(p.stat().st_size for p in fp32_model.files())
        out = {
            "runtime": args.runtime,
            "target": target_name,
            "threads": default_threads(),
            "encoder": exported.name,
            "exporter": exported.exporter,
            "conversion": r["conversion"],
            "texts_timed": len(texts),
            "batch": args.batch,
            "sentences_per_s": {k: round(float(np.median(v)), 1) for k, v in rates.items()},
            "sentences_per_s_batch1": {k: round(v, 1) for k, v in single.items()},
            "size_bytes": {"fp32": fp32_bytes, "int8": r["size"]["backbone_bytes"]},
            "val_texts": r["val"]["n"],
            "fp32_val_accuracy": ref.get("fp32_val_accuracy"),
            "int8_val_accuracy": ref.get("val_accuracy"),
            "accuracy_drop_pp": ref.get("accuracy_drop_pp"),
            "embedding_cosine_mean": ref.get("feature_cosine_mean"),
            "embedding_cosine_min": ref.get("feature_cosine_min"),
            "fit_seconds": round(fit_s, 1),
            # Other processes share this machine's cores; the 1-minute load average says how much.
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        out["speedup_int8_over_fp32"] = round(out["sentences_per_s"]["int8"] / out["sentences_per_s"]["fp32"], 2)
        out["speedup_batch1"] = round(single["int8"] / single["fp32"], 2)
        out["size_ratio"] = round(fp32_bytes / r["size"]["backbone_bytes"], 2)

    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    s, s1, z = out["sentences_per_s"], out["sentences_per_s_batch1"], out["size_bytes"]
    print(
        f"text encoder {out['encoder']} ({out['exporter']} export), {out['runtime']}, {out['threads']} threads, "
        f"INT8 by {out['conversion'].get('engine')} ({out['conversion'].get('mode')}); "
        f"load average {out['load_average'][0]:.1f} -> {out['load_average'][1]:.1f}"
    )
    print(
        f"throughput  batch {out['batch']}: FP32 {s['fp32']:.1f}  INT8 {s['int8']:.1f} sentences/s "
        f"(x{out['speedup_int8_over_fp32']:.2f}; median of {args.rounds} "
        f"alternating rounds over {out['texts_timed']} texts)"
    )
    print(
        f"            batch 1:  FP32 {s1['fp32']:.1f}  INT8 {s1['int8']:.1f} sentences/s (x{out['speedup_batch1']:.2f})"
    )
    print(
        f"size        FP32 {z['fp32'] / 1e6:.1f} MB  INT8 {z['int8'] / 1e6:.1f} MB (x{out['size_ratio']:.2f} smaller)"
    )
    print(
        f"accuracy    FP32 {out['fp32_val_accuracy'] * 100:.2f}%  INT8 {out['int8_val_accuracy'] * 100:.2f}%  "
        f"drop {out['accuracy_drop_pp']:+.2f} pp on {out['val_texts']} held-out-template texts; "
        f"embedding cosine mean {out['embedding_cosine_mean']:.4f} min {out['embedding_cosine_min']:.4f}"
    )


if __name__ == "__main__":
    main()
