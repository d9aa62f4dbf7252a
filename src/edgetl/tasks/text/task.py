"""Text classification with the same machinery as images: a CSV / TSV / JSONL of labelled texts in,
a classifier bundle out.

::

    CSV / TSV / JSONL ──► text rows (checked, split)      tokenizer.json ─┐
                                                                          ▼
    sentence encoder ──► ONNX (pooling inside) ──► INT8 for the target ──► embeddings (cached by
                                                                            sha256 of the text)
                                                                          │
                                            numpy head (linear / mlp / prototype) ◄┘ ──► bundle

The bundle is an ordinary edgetl bundle (``task = "text"``): the encoder as ``backbone.*``, its
``tokenizer.json``, ``heads/vN.npz``, ``exemplars.npz``, the fused ``model.*`` (token ids in,
class probabilities out) and ``report.json``. The device side needs numpy, ``tokenizers`` and the
runtime: no torch, no transformers.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...core.console import safe
from ...core.sessions import time_calls
from ...errors import DataError
from ..base import Calibration, digest_of, stratified_subset
from ..classify.classifier import ClassifierTask
from .data import is_text_data, load_text_dataset, read_lines, scan_texts
from .encoder import TextEncoder

log = logging.getLogger("edgetl")

# A typical ticket: what the batch-1 latency in the report is measured on.
LATENCY_TEXT = "Operator reports the hydraulic pump on line 3 is leaking oil near the main seal again."


class TextTask(ClassifierTask):
    """Labelled texts (support tickets, maintenance logs) -> which class is this text?"""

    name = "text"
    items = "texts"
    backbone_kind = "text"
    # ONNX Runtime with dynamic INT8: on this project's AVX2 test machine it embedded 1.4x faster
    # than FP32, while OpenVINO's static INT8 of the same encoder ran slower than OpenVINO FP32
    # (benchmarks/text.py); images default to openvino-cpu instead.
    default_target = "cpu-x86"
    item_key = "text"
    gate_metric = "accuracy"
    predict_options = frozenset({"top_k", "threshold", "file"})
    # Embeddings are 384 floats: 20 per class is small.
    exemplars_per_class = 20

    def claims(self, data: Path) -> bool:
        return is_text_data(data)

    def load_data(self, data: Path, options, cache_root: Path):
        return load_text_dataset(
            data,
            val=options.val,
            val_split=options.val_split,
            seed=options.seed,
            strict=options.strict,
            text_column=options.text_column,
            label_column=options.label_column,
        )

    def prepare_target(self, target):
        from ...errors import ConfigError

        if target.batch > 0:
            raise ConfigError(
                f"target {target.name} has a static batch ({target.batch}); text bundles need dynamic "
                "shapes for now: use cpu-x86, cpu-arm64 or openvino-cpu"
            )
        return target

    def calibration(self, data, target, exported, seed: int) -> Calibration:
        size = target.quantization.calibration_size
        texts = [data.train[i].text for i in stratified_subset([s.label for s in data.train], size=size, seed=seed)]

        def feeds():
            from ...core.sessions import open_session

            encoder = TextEncoder(
                open_session(exported.path),
                exported.tokenizer,
                max_length=exported.preprocess["max_length"],
                model_path=exported.path,
            )
            return encoder.calibration_feeds(texts)

        return Calibration(digest_of(texts), feeds, {"texts": len(texts), "requested": size}, len(texts))

    def extractor_for(self, session, model_path: Path | None, backbone: dict, root: Path) -> TextEncoder:
        pre = backbone.get("preprocess", {})
        return TextEncoder(
            session,
            Path(root) / pre.get("tokenizer", "tokenizer.json"),
            max_length=int(pre.get("max_length", 256)),
            model_path=model_path,
        )

    def fused_outputs(self, fused_session, items, exported) -> np.ndarray:
        encoder = TextEncoder(fused_session, exported.tokenizer, max_length=exported.preprocess["max_length"])
        return encoder.embed_batch([s.text for s in items])

    def write_release(self, folder: Path, trained, data, options, exported) -> dict:
        out = super().write_release(folder, trained, data, options, exported)
        shutil.copyfile(exported.tokenizer, folder / "tokenizer.json")
        out["models"] = {"tokenizer": "tokenizer.json"}
        return out

    def speed(self, shipped, reference, data) -> dict:
        """Batch-1 latency on a typical ticket and sentences per second, shipped vs FP32."""
        texts = [s.text for s in (data.val or data.train)[:64]]
        speed = {"sentences_per_s": round(_throughput(shipped, texts), 1)}
        if reference is not None:
            speed["fp32_sentences_per_s"] = round(_throughput(reference, texts), 1)
        latency = time_calls(lambda: shipped.embed_batch([LATENCY_TEXT]))
        return {"latency_batch1": {**latency, "float_precision": shipped.session.float_precision}, "throughput": speed}

    def bench_input(self, bundle, session, n: int) -> dict:
        """``n`` copies of a typical ticket, tokenized (one text per row, as predict runs it)."""
        return self.extractor_for(session, None, bundle.manifest["backbone"], bundle.path).tokenize([LATENCY_TEXT] * n)

    baseline_key = "bag-of-words-1"

    @property
    def baseline_name(self) -> str:
        from ...transfer.negative import TEXT_BASELINE_NAME

        return TEXT_BASELINE_NAME

    def baseline_features(self, items: Sequence, cache, exported) -> np.ndarray:
        from ...transfer.negative import bag_of_words_features

        return bag_of_words_features(s.text for s in items)

    def scan(self, data, *, bundle=None, strict: bool = False, group_by: str | None = None) -> tuple[list, list]:
        """Rows of ``data``, read with the training file's column names when the bundle records them."""
        if group_by:
            from ...errors import ConfigError

            raise ConfigError(
                "--group-by is for image data (a CSV column, folder or regex:PATTERN); text rows have no groups yet"
            )
        cols = bundle.manifest.get("training", {}).get("columns", {}) if bundle is not None else {}
        try:
            train, val, skipped, _ = scan_texts(
                data, strict=strict, text_column=cols.get("text"), label_column=cols.get("label")
            )
        except DataError as exc:
            if "no text column" not in str(exc) and "no label column" not in str(exc):
                raise
            train, val, skipped, _ = scan_texts(data, strict=strict)
        return train + (val or []), skipped

    def predict_items(self, inputs: Sequence) -> list:
        texts = [str(t) for t in inputs]
        if not texts:
            raise DataError("no text to classify; pass text arguments, --file FILE, or pipe lines on stdin")
        return texts

    def gather_inputs(self, args: Sequence[str], *, file=None, stdin=None) -> list[str]:
        """Texts from arguments, then ``--file`` lines, then stdin (when nothing else was given, or ``-``)."""
        stdin = sys.stdin if stdin is None else stdin
        texts = [str(a) for a in args if str(a) != "-"]
        for a in texts:
            # A lone argument that names a file is almost always a --file forgotten: say so once,
            # and still classify the string itself (an argument is a text, by contract).
            if len(a) < 4096 and "\n" not in a and Path(a).is_file():
                log.warning(
                    "%s is a file: classifying the string itself; to classify its lines: --file %s", safe(a), safe(a)
                )
                break
        if file is not None:
            texts += read_lines(file)
        if "-" in map(str, args) or (not args and file is None):
            if "-" not in map(str, args) and stdin.isatty():
                raise DataError("no text to classify; pass texts as arguments, --file FILE, or pipe lines on stdin")
            texts += [line.strip() for line in stdin.read().splitlines() if line.strip()]
        return texts

    cosine = ("embedding cosine", "feature_cosine_mean")
    skipped_key = "row"

    def fit_figures(self, result) -> dict:
        return {
            **super().fit_figures(result),
            "columns": result.data.columns,
            "throughput": result.report["throughput"],
        }

    def split_words(self, result) -> str:
        cols = result.data.columns
        return f"columns {cols.get('text')!r}, {cols.get('label')!r}"

    def model_line(self, result) -> str:
        r = result.report
        speed = r["throughput"]
        fp32 = f" (fp32 {speed['fp32_sentences_per_s']:.0f})" if "fp32_sentences_per_s" in speed else ""
        return (
            f"{r['size']['backbone_bytes'] / 1e6:.1f} MB encoder, {speed['sentences_per_s']:.0f} sentences/s"
            f"{fp32}, batch-1 latency {r['latency_batch1']['p50_ms']:.1f} ms (p50, this machine)"
        )

    def layout_hint(self, data) -> str:
        return "text and label columns"

    def prediction_line(self, p, safe) -> str:
        return f"{safe(p.label)}\t{p.confidence:.3f}\t{safe(p.item)}"


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
