"""The device side of a text backbone: tokenize with ``tokenizers``, embed with ONNX Runtime or OpenVINO.

A text bundle carries ``tokenizer.json`` (Hugging Face's single-file tokenizer format, read by the
Rust ``tokenizers`` library) and an encoder graph whose inputs are ``input_ids``,
``attention_mask`` (and ``token_type_ids`` for BERT-style models), dynamic in batch and sequence,
and whose first output is the mean-pooled, L2-normalised sentence embedding. So the device needs
numpy, ``tokenizers`` and its runtime: no torch, no transformers.

Texts are embedded in batches of similar length (sorted by character count, restored afterwards),
so a batch pads only to its own longest text. Vectors are cached by the sha256 of the text, under
a key of (model file, tokenizer file, maximum length).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...core.features import FeatureCache, file_digest, numerics_tag
from ...core.preprocess import DEFAULT_MAX_LENGTH, load_tokenizer
from ...errors import ConfigError, DataError
from .data import text_digest

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def text_model_key(model_path: str | Path | None, tokenizer_path: str | Path, max_length: int) -> str:
    """Cache namespace of one encoder file (+ its .bin for OpenVINO IR), tokenizer and max length."""
    parts = []
    if model_path is not None:
        model_path = Path(model_path)
        parts.append(file_digest(model_path))
        if model_path.suffix == ".xml" and model_path.with_suffix(".bin").is_file():
            parts.append(file_digest(model_path.with_suffix(".bin")))
    parts += [file_digest(tokenizer_path), f"max_length={max_length}"]
    return "text-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


class TextEncoder:
    """Tokenizer + encoder session: texts in, float32 sentence embeddings out.

    Example:
        >>> from edgetl.core.sessions import open_session
        >>> enc = TextEncoder(open_session("b/backbone.onnx"), "b/tokenizer.json")  # doctest: +SKIP
        >>> enc.features(["pump leaks oil", "HMI froze"]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(
        self,
        session,
        tokenizer_path: str | Path,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        model_path: str | Path | None = None,
    ):
        self.session = session
        self.tokenizer_path = Path(tokenizer_path)
        self.model_path = Path(model_path) if model_path else None
        self.max_length = int(max_length)
        self.tokenizer = load_tokenizer(self.tokenizer_path, max_length=self.max_length)
        unknown = [n for n in session.input_names if n not in MODEL_INPUTS]
        if unknown or "input_ids" not in session.input_names:
            raise ConfigError(
                f"{self.model_path}: inputs {session.input_names} are not a text encoder's "
                f"(expected {', '.join(MODEL_INPUTS[:2])} [, token_type_ids])"
            )
        self._key: str | None = None

    @property
    def cache_key(self) -> str:
        if self._key is None:
            base = text_model_key(self.model_path, self.tokenizer_path, self.max_length)
            self._key = f"{base}-{hashlib.sha256(numerics_tag(self.session).encode()).hexdigest()[:8]}"
        return self._key

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's int64 inputs for one batch, padded to the batch's longest text."""
        enc = self.tokenizer.encode_batch(list(texts))
        arrays = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }
        return {name: arrays[name] for name in self.session.input_names}

    def calibration_feeds(self, texts: Sequence[str]) -> list[dict]:
        """One feed dict per text (batch 1, its own length: no padding skews the ranges)."""
        return [self.tokenize([t]) for t in texts]

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of one batch, no cache. A dynamically quantized encoder runs text by text:
        its scales come from the whole batch, so batch-mates would move a text's embedding
        (cosine down to 0.98 on the tickets example) and the device's answer would depend on
        what else it was asked; one at a time cost 10% throughput there."""
        if not self.session.rows_independent and len(texts) > 1:
            return np.concatenate([self.embed_batch([t]) for t in texts])
        return np.asarray(self.session.run(self.tokenize(texts))[0], dtype=np.float32)

    def features(
        self,
        items: Sequence,
        *,
        cache: FeatureCache | None = None,
        view: int = 0,
        batch_size: int = 32,
        quiet: bool = True,
        desc: str = "features",
        skipped: list | None = None,
    ) -> np.ndarray:
        """Embeddings for texts or text samples (rows in order), from the cache where possible.

        Raises:
            DataError: an empty text.
        """
        texts = [getattr(i, "text", i) for i in items]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"text {i + 1} is empty; give non-empty text")
        digests = [getattr(i, "digest", None) or text_digest(t) for i, t in zip(items, texts)]
        out: list[np.ndarray | None] = [cache.get(d, 0) if cache else None for d in digests]
        todo = sorted((i for i, v in enumerate(out) if v is None), key=lambda i: len(texts[i]))
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            feats = self.embed_batch([texts[i] for i in idx])
            for i, vec in zip(idx, feats):
                out[i] = vec
                if cache:
                    cache.put(digests[i], 0, vec)
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.stack([v for v in out if v is not None]).astype(np.float32, copy=False)
