"""Text classification with the same machinery as images: fit, evaluate, predict, adapt.

::

    CSV / TSV / JSONL ──► text rows (checked, split)      tokenizer.json ─┐
                                                                          ▼
    sentence encoder ──► ONNX (pooling inside) ──► INT8 for the target ──► embeddings (cached by
                                                                            sha256 of the text)
                                                                          │
                                            numpy head (linear / mlp / prototype) ◄┘ ──► bundle

The bundle is an ordinary edgetl bundle (``task = "text"``): the encoder as ``backbone.*``, its
``tokenizer.json``, ``heads/vN.npz``, ``exemplars.npz``, the fused ``model.*`` (token ids in,
class probabilities out) and ``report.json``. The device side (:class:`TextPredictor`,
:func:`adapt_text`) needs numpy, ``tokenizers`` and the runtime: no torch, no transformers.

Example:
    >>> r = fit_text("tickets.csv", "tickets.bundle")  # doctest: +SKIP
    >>> TextPredictor("tickets.bundle").predict(["conveyor motor smells burnt"])[0].label  # doctest: +SKIP
    'overheating'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .bundle import Bundle, BundleWriter, check_out_dir, load_bundle
from .errors import BundleError, ConfigError, DataError
from .gate import GateDecision, accuracy_gate, enforce
from .heads import HeadConfig, train_head
from .report import classification_metrics
from .text_data import TextDataset, is_text_data, load_text_dataset, scan_texts
from .text_encoder import TextEncoder

__all__ = ["TextFitOptions", "TextFitResult", "fit_text", "export_text_bundle", "TextPredictor", "TextPrediction",
           "adapt_text", "is_text_bundle", "is_text_data"]

# Exemplars kept per class for on-device replay (embeddings are 384 floats: 20 per class is small).
EXEMPLARS_PER_CLASS = 20
# Without --target, text bundles go to ONNX Runtime with dynamic INT8: on this project's AVX2 test
# machine it embedded 1.4x faster than FP32, while OpenVINO's static INT8 of the same encoder ran
# slower than OpenVINO FP32 (benchmarks/text.py; images default to openvino-cpu instead).
TEXT_DEFAULT_TARGET = "cpu-x86"
# A typical ticket: what the batch-1 latency in the report is measured on.
_LATENCY_TEXT = "Operator reports the hydraulic pump on line 3 is leaking oil near the main seal again."


def is_text_bundle(bundle: Bundle) -> bool:
    return bundle.task == "text"


# ---------------------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class TextFitOptions:
    """What ``fit`` can be told for text. Field names match :class:`edgetl.fit.FitOptions` where shared.

    Attributes:
        backbone: text registry name, local Hugging Face folder, or hub name.
        quantization: ``auto`` (dynamic INT8 on ONNX Runtime, NNCF static on OpenVINO),
            ``dynamic`` or ``static``.
        exporter: ``auto`` (Optimum when installed), ``optimum`` or ``torch``.
        text_column / label_column: column names when the common names do not fit.
    """

    backbone: str | None = None
    head: HeadConfig = field(default_factory=HeadConfig)
    target: str | None = None
    precision: str | None = None
    runtime: str | None = None
    val: str | None = None
    val_split: float = 0.2
    seed: int = 0
    cache_dir: str | None = None
    strict: bool = False
    calibration_size: int | None = None
    allow_drop: bool = False
    reference: bool = True
    quantization: str = "auto"
    exporter: str = "auto"
    text_column: str | None = None
    label_column: str | None = None
    exemplars_per_class: int = EXEMPLARS_PER_CLASS
    batch_size: int = 32
    quiet: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head"] = self.head.to_dict()
        return d


@dataclass
class TextFitResult:
    """What :func:`fit_text` produced; shaped like :class:`edgetl.fit.FitResult`."""

    bundle: Bundle
    metrics: dict
    report: dict
    dataset: TextDataset
    timings: dict


def _converted_text_model(exported, target, calibration: list[str], cache_root: Path, mode: str):
    """The target's encoder file, from the cache when the same settings and texts made it before."""
    from .quantize import ConvertedModel
    from .text_export import convert_text

    settings = {"fp32": exported.digest, "fp32_file": exported.path.parent.name, "precision": target.precision,
                "runtime": target.runtime, "opset": target.opset, "mode": mode,
                "quantization": asdict(target.quantization), "target": target.name}
    if target.precision == "int8":
        settings["calibration"] = hashlib.sha256("\n".join(calibration).encode()).hexdigest()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_root / "models" / f"text-{key}"
    info_path = folder / "info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return ConvertedModel(folder / info["file"], target.runtime, target.precision, info)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        converted = convert_text(exported, target=target, out_dir=tmp, calibration=calibration, mode=mode)
        converted.info["file"] = converted.path.name
        (tmp / "info.json").write_text(json.dumps(converted.info, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertedModel(folder / converted.path.name, converted.runtime, converted.precision, converted.info)


def _calibration_texts(ds: TextDataset, size: int, seed: int) -> tuple[list[str], dict]:
    """A class-stratified subset of the *training* texts (never validation) for static INT8."""
    from .quantize import calibration_subset

    idx = calibration_subset([s.label for s in ds.train], size=size, seed=seed)
    return [ds.train[i].text for i in idx], {"texts": len(idx), "requested": size}


def _throughput(encoder: TextEncoder, texts: Sequence[str], *, batch_size: int = 32, min_seconds: float = 0.5) -> float:
    """Sentences per second of ``encoder`` over ``texts`` (uncached, after one warm-up batch)."""
    texts = list(texts)
    encoder.embed_batch(texts[:batch_size])
    n, t0 = 0, time.perf_counter()
    while True:
        for start in range(0, len(texts), batch_size):
            encoder.embed_batch(texts[start : start + batch_size])
        n += len(texts)
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0)


def _latency(encoder: TextEncoder, *, runs: int = 20) -> dict:
    for _ in range(3):
        encoder.embed_batch([_LATENCY_TEXT])
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        encoder.embed_batch([_LATENCY_TEXT])
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.median(times)), 3), "p90_ms": round(float(np.percentile(times, 90)), 3)}


def _embed_split(encoder: TextEncoder, rows, cache, batch_size: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, 0), np.float32)
    return encoder.encode([s.text for s in rows], digests=[s.digest for s in rows], cache=cache, batch_size=batch_size)


def fit_text(data: str | Path, out: str | Path, *, options: TextFitOptions = TextFitOptions(),
             force: bool = False, signer=None) -> TextFitResult:
    """Train a head on a frozen sentence encoder for the labelled texts in ``data``; write a bundle.

    Args:
        data: CSV / TSV / JSONL with text and label columns (see :func:`edgetl.text_data.load_text_dataset`).
        out: bundle directory to create (refused if non-empty unless ``force``).
        options: encoder, head, target, precision, split, cache ...
        force: replace an existing bundle at ``out`` (atomically).

    Raises:
        DataError: bad dataset.  ConfigError: bad option or profile.
        GateError: the quantized encoder lost more accuracy than the profile allows (unless ``allow_drop``).

    Example:
        >>> r = fit_text("tickets.csv", "tickets.bundle", options=TextFitOptions(target="cpu-arm64"))  # doctest: +SKIP
        >>> r.metrics["accuracy"], r.report["reference"]["accuracy_drop_pp"]  # doctest: +SKIP
    """
    from .backbones import default_cache_dir
    from .features import FeatureCache
    from .fit import resolve_target
    from .fuse import check_parity, fuse, parity
    from .quantize import feature_cosine
    from .text_export import export_text_backbone

    out = Path(out)
    check_out_dir(out, force=force, data=data)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        t = now

    target = resolve_target(options if options.target else dataclasses.replace(options, target=TEXT_DEFAULT_TARGET))
    if target.batch > 0:
        raise ConfigError(f"target {target.name} has a static batch ({target.batch}); text bundles need dynamic "
                          "shapes for now: use cpu-x86, cpu-arm64 or openvino-cpu")
    ds = load_text_dataset(data, val=options.val, val_split=options.val_split, seed=options.seed, strict=options.strict,
                           text_column=options.text_column, label_column=options.label_column)
    lap("scan")
    cache_root = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    exported = export_text_backbone(options.backbone, cache_dir=cache_root, opset=target.opset, exporter=options.exporter)
    lap("export")
    mode = options.quantization
    static = target.precision == "int8" and (target.runtime == "openvino" or mode == "static")
    calib, calib_info = (_calibration_texts(ds, target.quantization.calibration_size, options.seed) if static else ([], {}))
    shipped = _converted_text_model(exported, target, calib, cache_root, mode)
    if calib_info:
        shipped.info["calibration"] = calib_info
    lap("convert")

    def open_encoder(path):
        shipped_model = path == shipped.path
        return TextEncoder(path, exported.tokenizer, runtime=target.runtime if shipped_model else "onnxruntime",
                           device=target.device, max_length=exported.max_length,
                           float_precision=target.session_precision if shipped_model else "f32")

    encoder = open_encoder(shipped.path)
    cache = FeatureCache(cache_root, encoder.cache_key)
    X_tr = _embed_split(encoder, ds.train, cache, options.batch_size)
    X_va = _embed_split(encoder, ds.val, cache, options.batch_size)
    lap("features")
    runs = cache.misses
    index = {c: i for i, c in enumerate(ds.classes)}
    y_tr = np.array([index[s.label] for s in ds.train], dtype=np.int64)
    y_va = np.array([index[s.label] for s in ds.val], dtype=np.int64)
    head = train_head(X_tr, y_tr, ds.classes, cfg=options.head, X_val=X_va if len(y_va) else None,
                      y_val=y_va if len(y_va) else None)
    lap("head")
    val_metrics = classification_metrics(y_va, head.predict(X_va), ds.classes) if len(y_va) else {}
    train_metrics = classification_metrics(y_tr, head.predict(X_tr), ds.classes)

    # Reference: the FP32 ONNX encoder in ONNX Runtime, same head settings, to measure what the
    # conversion costs (the same gate images get).
    ref: dict = {}
    fp32_encoder = None
    decision = GateDecision("accuracy", target.accuracy_tolerance, 0, method="the shipped encoder is the reference")
    if options.reference and not (target.precision == "fp32" and target.runtime == "onnxruntime"):
        fp32_encoder = open_encoder(exported.path)
        ref_cache = FeatureCache(cache_root, fp32_encoder.cache_key)
        R_tr = _embed_split(fp32_encoder, ds.train, ref_cache, options.batch_size)
        R_va = _embed_split(fp32_encoder, ds.val, ref_cache, options.batch_size)
        runs += ref_cache.misses
        fixed = HeadConfig.from_dict({**options.head.to_dict(), "l2": head.meta.get("l2", options.head.l2)})
        ref_head = train_head(R_tr, y_tr, ds.classes, cfg=fixed)
        ref_correct = ref_head.predict(R_va) == y_va
        ref_acc = float(np.mean(ref_correct)) if len(y_va) else None
        decision = accuracy_gate(ref_correct, head.predict(X_va) == y_va, tolerance_pp=target.accuracy_tolerance)
        cos = feature_cosine(R_va, X_va) if len(y_va) else feature_cosine(R_tr, X_tr)
        ref = {"fp32_val_accuracy": ref_acc, "val_accuracy": val_metrics.get("accuracy"),
               "feature_cosine_mean": round(float(cos.mean()), 5), "feature_cosine_min": round(float(cos.min()), 5)}
        if ref_acc is not None and val_metrics:
            ref["accuracy_drop_pp"] = round((ref_acc - val_metrics["accuracy"]) * 100, 3)
    lap("reference")
    gate = decision.to_dict()
    enforce(decision, model=f"{target.precision} encoder", target=target.name, items="texts",
            allow=options.allow_drop, hint="try --precision fp32 or another --target")

    from .adapt import herding, save_exemplars

    with BundleWriter(out, force=force, data=data, signer=signer) as w:
        backbone_name = f"backbone{shipped.path.suffix}"
        for src in shipped.files():
            shutil.copyfile(src, w.dir / f"backbone{src.suffix}")
        shutil.copyfile(exported.tokenizer, w.dir / "tokenizer.json")
        (w.dir / "heads").mkdir()
        head.save(w.dir / "heads" / "v1.npz")
        ex_idx = herding(X_tr, y_tr, len(ds.classes), per_class=options.exemplars_per_class)
        save_exemplars(w.dir / "exemplars.npz", X_tr[ex_idx], y_tr[ex_idx], ds.classes)
        backbone = exported.to_dict()
        meta = {"edgetl_version": __version__, "task": "text", "labels": ds.classes, "preprocess": backbone["preprocess"],
                "backbone": exported.name, "precision": target.precision, "target": target.name}
        fused_path = fuse(w.dir / backbone_name, head, w.dir / "model", meta=meta)
        lap("bundle")
        probe = [s.text for s in (ds.val or ds.train)[:16]]
        fused = TextEncoder(fused_path, exported.tokenizer, runtime=target.runtime, device=target.device,
                            max_length=exported.max_length, float_precision=target.session_precision)
        par = parity(fused.embed_batch(probe), head.proba(encoder.embed_batch(probe)))
        check_parity(par, par["max_abs_diff"], "max probability difference", allow=options.allow_drop)
        bench_texts = [s.text for s in (ds.val or ds.train)[:64]]
        speed = {"sentences_per_s": round(_throughput(encoder, bench_texts), 1)}
        if fp32_encoder is not None:
            speed["fp32_sentences_per_s"] = round(_throughput(fp32_encoder, bench_texts), 1)
        sizes = {"backbone_bytes": sum(p.stat().st_size for p in shipped.files()), "fp32_bytes": exported.path.stat().st_size}
        report = {"task": "text", "precision": target.precision, "runtime": target.runtime, "target": target.name,
                  "conversion": shipped.info, "reference": ref, "gate": gate, "fused_parity": par,
                  "numerics": {"features": encoder.session.describe(), "fused": fused.session.describe(),
                               "target_float_precision": target.session_precision},
                  "latency_batch1": _latency(encoder), "throughput": speed, "size": sizes, "val": val_metrics,
                  "train_accuracy": train_metrics["accuracy"], "timings_s": timings}
        (w.dir / "report.json").write_text(json.dumps(report, indent=2))
        head_entry = {
            "version": 1, "file": "heads/v1.npz", "exemplars": "exemplars.npz", "fused": fused_path.name,
            "kind": head.kind, "labels": ds.classes, "source": "fit",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "val_accuracy": val_metrics.get("accuracy"), "unknown_threshold": 0.0, "l2": head.meta.get("l2"),
        }
        manifest = {
            "edgetl_version": __version__,
            "task": "text",
            "labels": ds.classes,
            "backbone": backbone,
            "target": target.to_dict(),
            "precision": target.precision,
            "runtime": target.runtime,
            "models": {"backbone": backbone_name, "fused": fused_path.name, "tokenizer": "tokenizer.json"},
            "head": {"current": 1, "versions": [head_entry]},
            "exemplars": {"file": "exemplars.npz", "per_class": options.exemplars_per_class, "selection": "herding"},
            "thresholds": {"unknown": 0.0},
            "metrics": {"val": {k: val_metrics.get(k) for k in ("accuracy", "balanced_accuracy", "per_class_recall")},
                        "train_accuracy": train_metrics["accuracy"], **({"reference": ref} if ref else {})},
            "training": {"data": str(Path(data).resolve()), "layout": ds.layout, "counts": ds.counts(),
                         "columns": ds.columns, "options": options.to_dict(), "skipped": len(ds.skipped)},
            "device_packages": ["edgetl[text]"] + (["edgetl[openvino]"] if target.runtime == "openvino" else []),
        }
        bundle = w.commit(manifest)
    lap("finish")
    timings["backbone_texts"] = runs
    return TextFitResult(bundle, val_metrics, report, ds, timings)


def export_text_bundle(run: str | Path, out: str | Path, *, target: str | None = None, precision: str | None = None,
                       runtime: str | None = None, data: str | Path | None = None, allow_drop: bool = False,
                       cache_dir: str | Path | None = None, force: bool = False, quiet: bool = False,
                       signer=None) -> TextFitResult:
    """Re-make text bundle ``run`` for another target, precision or runtime (the text twin of
    :func:`edgetl.export.export_bundle`): the recorded data, split, encoder and head settings (the
    chosen L2 included) are fitted again; the FP32 export and embeddings come from the cache.

    Raises:
        BundleError: ``run`` is not a text bundle made by ``fit``.
        DataError: the recorded training data is gone and ``data`` was not given.
    """
    src = load_bundle(run)
    training = src.manifest.get("training") or {}
    if not is_text_bundle(src) or "options" not in training:
        raise BundleError(f"{run}: not a text bundle that records how it was fitted; run edgetl fit instead")
    recorded = dict(training["options"])
    head_cfg = HeadConfig.from_dict(recorded.pop("head"))
    chosen_l2 = src.head_entry(1).get("l2")
    if head_cfg.l2 is None and chosen_l2 is not None:
        head_cfg = dataclasses.replace(head_cfg, l2=chosen_l2)
    names = {f.name for f in dataclasses.fields(TextFitOptions)} - {"head"}
    opts = TextFitOptions(**{k: v for k, v in recorded.items() if k in names}, head=head_cfg)
    from .export import retargeted

    opts, data_path = retargeted(opts, training["data"], target=target, precision=precision, runtime=runtime,
                                 data=data, allow_drop=allow_drop, cache_dir=cache_dir, quiet=quiet, data_hint="FILE")
    return fit_text(data_path, out, options=opts, force=force, signer=signer)


# ------------------------------------------------------------------------------------ predict


@dataclass
class TextPrediction:
    """One text's answer. ``label`` is ``"unknown"`` when confidence is under the threshold."""

    text: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    unknown: bool = False

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label, "confidence": round(self.confidence, 6),
                "unknown": self.unknown, "top_k": [{"label": l, "p": round(p, 6)} for l, p in self.top_k]}


def open_text_encoder(bundle: Bundle, *, device: str | None = None, threads: int | None = None) -> TextEncoder:
    """The bundle's encoder and tokenizer, on its target's runtime / device / providers."""
    if not is_text_bundle(bundle):
        raise BundleError(f"{bundle.path}: a {bundle.task!r} bundle, not a text bundle")
    target = bundle.manifest.get("target", {})
    pre = bundle.manifest["backbone"].get("preprocess", {})
    return TextEncoder(bundle.model_file("backbone"), bundle.file(bundle.manifest["models"].get("tokenizer", "tokenizer.json")),
                       runtime=bundle.runtime, device=device or target.get("device"), providers=target.get("providers"),
                       threads=threads, max_length=int(pre.get("max_length", 256)), float_precision=bundle.float_precision)


class TextPredictor:
    """A text bundle ready to classify (device side: numpy, tokenizers, the runtime).

    Example:
        >>> p = TextPredictor("tickets.bundle")  # doctest: +SKIP
        >>> [r.label for r in p.predict(["screen frozen after update", "oil under the press"])]  # doctest: +SKIP
    """

    def __init__(self, bundle: Bundle | str | Path, *, device: str | None = None, threads: int | None = None,
                 head_version: int | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.encoder = open_text_encoder(self.bundle, device=device, threads=threads)
        self.head = self.bundle.load_head(head_version)
        entry = self.bundle.head_entry(head_version)
        self.threshold = float(entry.get("unknown_threshold", self.bundle.manifest.get("thresholds", {}).get("unknown", 0.0)))

    @property
    def labels(self) -> list[str]:
        return self.head.labels

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.head.proba(self.encoder.encode(texts))

    def predict(self, texts: Sequence[str], *, top_k: int = 1, threshold: float | None = None) -> list[TextPrediction]:
        """Classify texts, in order.

        Raises:
            DataError: no texts, or an empty one.
        """
        from .runtime import check_confidence

        check_confidence(threshold)
        texts = list(texts)
        if not texts:
            raise DataError("no text to classify; pass text arguments, --file FILE, or pipe lines on stdin")
        probs = self.proba(texts)
        thr = self.threshold if threshold is None else threshold
        k = max(1, min(top_k, len(self.labels)))
        out = []
        for text, p in zip(texts, probs):
            order = np.argsort(-p, kind="stable")[:k]
            best = int(order[0])
            unknown = bool(p[best] < thr)
            out.append(TextPrediction(text, "unknown" if unknown else self.labels[best], float(p[best]),
                                      [(self.labels[int(i)], float(p[int(i)])) for i in order], unknown))
        return out

    def evaluate(self, data: str | Path, *, strict: bool = False) -> dict:
        """Accuracy, per-class recall and confusion matrix on every labelled row of ``data``.

        Raises:
            DataError: no usable rows, or a class the bundle does not know.
        """
        cols = self.bundle.manifest.get("training", {}).get("columns", {})
        train, val, skipped, _ = _scan_like_training(data, cols, strict)
        rows = train + (val or [])
        if not rows:
            raise DataError(f"{data}: no usable labelled rows to evaluate ({len(skipped)} skipped)")
        unknown = sorted({s.label for s in rows} - set(self.labels))
        if unknown:
            raise DataError(f"{data}: class {unknown[0]!r} is not in this bundle (knows: {', '.join(self.labels)}); "
                            "teach it first with adapt_text(bundle, data)")
        index = {l: i for i, l in enumerate(self.labels)}
        X = self.encoder.encode([s.text for s in rows], digests=[s.digest for s in rows])
        y = np.array([index[s.label] for s in rows], dtype=np.int64)
        m = classification_metrics(y, self.head.predict(X), self.labels)
        m["skipped"] = [{"path": w, "reason": r} for w, r in skipped]
        m["head_version"] = self.bundle.head_version
        return m


def _scan_like_training(data, cols: dict, strict: bool):
    """Read ``data`` with the training file's column names when it has them, else auto-detect."""
    try:
        return scan_texts(data, strict=strict, text_column=cols.get("text"), label_column=cols.get("label"))
    except DataError as exc:
        if "no text column" in str(exc) or "no label column" in str(exc):
            return scan_texts(data, strict=strict)
        raise


# -------------------------------------------------------------------------------------- adapt


def adapt_text(
    bundle: str | Path | Bundle,
    data: str | Path,
    *,
    replace: bool = False,
    force: bool = False,
    tolerance_pp: float | None = None,
    holdout: float | None = None,
    seed: int = 0,
    strict: bool = False,
    dry_run: bool = False,
    wait: float = 0.0,
    signer=None,
):
    """Retrain a text bundle's head on new labelled rows in ``data`` (plus replayed exemplars).

    The device-side twin of :func:`edgetl.adapt.adapt`: the rows go through the bundle's own
    encoder, then the same replay, gate, versioning and atomic manifest switch apply
    (``rollback`` and ``history`` work on text bundles unchanged).

    Args:
        bundle: text bundle directory (or a loaded Bundle).
        data: CSV / TSV / JSONL with text and label columns; new labels extend the label set.
        replace, force, tolerance_pp, holdout, seed, dry_run, wait, signer: as for :func:`edgetl.adapt.adapt`.
        strict: make bad rows fatal instead of skipped.

    Returns:
        :class:`edgetl.adapt.AdaptResult` (``skipped`` lists ``(file:line, reason)``).

    Raises:
        BundleError: not a text bundle, damaged or read-only.  DataError: no usable rows.
        GateError: the update would hurt known classes or the new labels are not learnable.
    """
    from . import adapt as _adapt

    tolerance_pp = _adapt.DEFAULT_TOLERANCE_PP if tolerance_pp is None else tolerance_pp
    holdout = _adapt.HOLDOUT if holdout is None else holdout
    t0 = time.perf_counter()
    _adapt.check_tolerance(tolerance_pp)
    with _adapt.for_update(bundle, operation="adapt", dry_run=dry_run, wait=wait) as b:
        if not is_text_bundle(b):
            raise BundleError(f"{b.path}: a {b.task!r} bundle; adapt it with edgetl adapt")
        cols = b.manifest.get("training", {}).get("columns", {})
        train, val, skipped, _ = _scan_like_training(data, cols, strict)
        rows = train + (val or [])
        if not rows:
            raise DataError(f"{data}: no usable labelled rows ({len(skipped)} skipped); expected text and label columns")
        X_new = open_text_encoder(b).encode([s.text for s in rows], digests=[s.digest for s in rows])
        timings = {"features": round(time.perf_counter() - t0, 3)}
        return _adapt.update_head(b, X_new, [s.label for s in rows], data=data, n_items=len(rows), skipped=skipped,
                                  replace=replace, force=force, tolerance_pp=tolerance_pp, holdout=holdout, seed=seed,
                                  dry_run=dry_run, timings=timings, t0=t0, signer=signer)


