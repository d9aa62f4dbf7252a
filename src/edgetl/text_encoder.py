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
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, DataError, require
from .features import FeatureCache, file_digest
from .sessions import open_session
from .text_data import text_digest

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_MAX_LENGTH = 256


def text_model_key(model_path: str | Path, tokenizer_path: str | Path, max_length: int) -> str:
    """Cache namespace of one encoder file (+ its .bin for OpenVINO IR), tokenizer and max length."""
    model_path = Path(model_path)
    parts = [file_digest(model_path)]
    if model_path.suffix == ".xml" and model_path.with_suffix(".bin").is_file():
        parts.append(file_digest(model_path.with_suffix(".bin")))
    parts += [file_digest(tokenizer_path), f"max_length={max_length}"]
    return "text-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def load_tokenizer(path: str | Path, *, max_length: int = DEFAULT_MAX_LENGTH):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``: truncating to ``max_length`` and padding
    each batch to its longest row (whatever padding the file was saved with).

    Raises:
        MissingDependency: ``tokenizers`` is not installed (``pip install 'edgetl[text]'``).
        ConfigError: the file is not a tokenizer.
    """
    tk = require("tokenizers", extra="text", purpose="tokenizing text")
    try:
        tok = tk.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a plain Exception for bad files
        raise ConfigError(f"{path}: not a readable tokenizer.json ({exc})") from None
    pad = tok.padding or {}
    pad_id = pad.get("pad_id", 0)
    pad_token = pad.get("pad_token", "[PAD]")
    tok.no_padding()
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tok.no_truncation()
    tok.enable_truncation(max_length=max_length)
    return tok


class TextEncoder:
    """Tokenizer + encoder session: texts in, float32 sentence embeddings out.

    Example:
        >>> enc = TextEncoder("b/backbone.onnx", "b/tokenizer.json")  # doctest: +SKIP
        >>> enc.encode(["pump leaks oil", "HMI froze"]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, *, runtime: str | None = None,
                 device: str | None = None, providers: Sequence[str] | None = None, threads: int | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, float_precision: str = "f32"):
        self.model_path, self.tokenizer_path = Path(model_path), Path(tokenizer_path)
        self.max_length = int(max_length)
        self.tokenizer = load_tokenizer(self.tokenizer_path, max_length=self.max_length)
        self.session = open_session(self.model_path, runtime=runtime, device=device,
                                    providers=list(providers) if providers else None, threads=threads,
                                    float_precision=float_precision)
        unknown = [n for n in self.session.input_names if n not in MODEL_INPUTS]
        if unknown or "input_ids" not in self.session.input_names:
            raise ConfigError(f"{self.model_path}: inputs {self.session.input_names} are not a text encoder's "
                              f"(expected {', '.join(MODEL_INPUTS[:2])} [, token_type_ids])")
        self._key: str | None = None

    @property
    def cache_key(self) -> str:
        if self._key is None:
            from .features import numerics_tag

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

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of one batch, no cache."""
        return np.asarray(self.session.run(self.tokenize(texts))[0], dtype=np.float32)

    def encode(self, texts: Sequence[str], *, digests: Sequence[str] | None = None, cache: FeatureCache | bool | None = None,
               cache_root: str | Path | None = None, batch_size: int = 32) -> np.ndarray:
        """Embeddings for ``texts`` (rows in order), from the cache where possible.

        Args:
            texts: the texts; none may be empty.
            digests: sha256 of each text (computed when omitted).
            cache: a :class:`FeatureCache` to use, or None for none; with ``cache_root`` given,
                one is opened under this encoder's key.
            batch_size: texts per runtime call.

        Raises:
            DataError: an empty text.
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"text {i + 1} is empty; give non-empty text")
        if cache is None and cache_root is not None:
            cache = FeatureCache(cache_root, self.cache_key)
        digests = list(digests) if digests is not None else [text_digest(t) for t in texts]
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
        return np.stack(out).astype(np.float32, copy=False)
