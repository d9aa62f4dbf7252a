"""Batched feature extraction through a runtime session, with an on-disk cache.

The backbone is frozen, so each image goes through it once per (model, preprocessing, view). The
cache key is the image's content hash plus the *model file's* hash (which pins architecture,
weights and precision: an INT8 model calibrated differently is a different model) plus the
preprocessing digest plus the augmentation view. A second ``fit`` with another head or
hyper-parameters finds every vector here and never runs the backbone.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import secrets
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ..errors import DataError
from .bundle import sha256_file
from .console import progress
from .preprocess import DECODE_VERSION, PreprocessConfig, load_rgb, resize_crop, resize_side, to_tensor


def default_cache_dir() -> Path:
    """Where everything expensive is kept between runs: ``$EDGETL_CACHE``, else ``~/.cache/edgetl``."""
    env = os.environ.get("EDGETL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgetl"


def staging_dir(folder: Path) -> Path:
    """A private sibling of cache ``folder`` to build it in: two processes filling the same cache
    entry at once (two fits on one machine, parallel test workers) never write into each other's."""
    return folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def publish_dir(tmp: Path, folder: Path, marker: str) -> bool:
    """Move the complete ``tmp`` into place as ``folder`` in one rename. When another process
    published the same entry first, theirs is kept (same key, same content) and ``tmp`` removed,
    so a reader never sees a folder deleted or half-replaced under it. A ``folder`` without its
    ``marker`` file (written last) is a broken entry from an older edgetl and is replaced.
    -> whether ours was used."""
    if folder.is_dir() and not (folder / marker).is_file():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
        return True
    except OSError:
        if not folder.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def file_digest(path: str | Path, *, length: int | None = None) -> str:
    digest = sha256_file(Path(path))
    return digest[:length] if length else digest


def model_key(model_path: str | Path, preprocess: PreprocessConfig) -> str:
    """Cache namespace of one model file + preprocessing (OpenVINO IR: the .bin holds the weights)."""
    model_path = Path(model_path)
    parts = [file_digest(model_path)]
    weights = model_path.with_suffix(".bin")
    if model_path.suffix == ".xml" and weights.is_file():
        parts.append(file_digest(weights))
    parts.append(preprocess.digest())
    if DECODE_VERSION > 1:  # the first decoder's vectors keep their keys
        parts.append(f"decode-{DECODE_VERSION}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def numerics_tag(session) -> str:
    """What decides a session's numbers beyond the model file: runtime, float precision, and the
    INT8 path (exact emulation, or this CPU family's native kernels, which differ between AVX2
    and VNNI machines). Part of every feature cache key, so features computed one way are never
    served for another (a bf16 run for an f32 one, say)."""
    from .sessions import cpu_family

    path = "exact" if session.emulated else f"native-{cpu_family()['int8']}"
    rows = "" if session.rows_independent else "-row-by-row"
    return f"{session.runtime}-{session.float_precision}-{path}{rows}"


def session_key(session, model_path: str | Path, preprocess: PreprocessConfig) -> str:
    """Cache namespace of features computed by ``session`` on ``model_path`` (see :func:`numerics_tag`)."""
    tag = hashlib.sha256(numerics_tag(session).encode()).hexdigest()[:8]
    return f"{model_key(model_path, preprocess)}-{tag}"


class FeatureCache:
    """``root/<model_key>/v<view>/<ab>/<digest>.npy``: one small file per vector, written atomically."""

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / "features" / key
        self.hits = 0
        self.misses = 0

    def _path(self, digest: str, view: int) -> Path:
        return self.dir / f"v{view}" / digest[:2] / f"{digest}.npy"

    def get(self, digest: str, view: int) -> np.ndarray | None:
        p = self._path(digest, view)
        try:
            vec = np.load(p, allow_pickle=False)
        except (OSError, ValueError):  # absent, or a torn write from a killed process: recompute
            self.misses += 1
            return None
        self.hits += 1
        return vec

    def put(self, digest: str, view: int, vec: np.ndarray) -> None:
        p = self._path(digest, view)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vec, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, p)


def augment(im: Image.Image, *, seed: int) -> Image.Image:
    """A mild, label-preserving random view: crop 60-100%, flip, small rotation, light/colour jitter.

    Deterministic for a given seed so an augmented view can be cached like a plain one.
    """
    rng = random.Random(seed)
    w, h = im.size
    s = rng.uniform(0.6, 1.0) ** 0.5
    cw, ch = max(8, int(w * s)), max(8, int(h * s))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    angle = rng.uniform(-10, 10)
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.75, 1.25))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.75, 1.25))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.2:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return im


def _seed_for(digest: str, view: int) -> int:
    return int(hashlib.sha256(f"{digest}:{view}".encode()).hexdigest()[:12], 16)


# An augmented view keeps as little as this share of the side (the 60 % area crop of
# :func:`augment`), so its decode keeps proportionally more pixels.
_AUGMENT_MIN_SIDE = 0.6**0.5


def load_input(path: Path, preprocess: PreprocessConfig, *, digest: str = "", view: int = 0) -> np.ndarray:
    """Decode (sized for the model, region of interest cut out) + (optionally augment) + preprocess
    one image into the backbone's CHW input."""
    need = resize_side(preprocess)
    im = load_rgb(path, cfg=preprocess, need=math.ceil(need / _AUGMENT_MIN_SIDE) if view else need)
    try:
        if view:
            im = augment(im, seed=_seed_for(digest or str(path), view))
        return to_tensor(resize_crop(im, preprocess), preprocess)
    except (OSError, ValueError, OverflowError, MemoryError) as exc:  # one bad image, never the folder
        raise DataError(f"{path}: cannot be brought to the model's input ({exc})") from None


def decode_threads() -> int:
    """Threads that decode images ahead of the model: ``EDGETL_DECODE_THREADS``, else the CPU count
    up to 4 (decoding a 5 MP JPEG sized for the model takes about 10 ms on one core)."""
    try:
        n = int(os.environ.get("EDGETL_DECODE_THREADS", "0"))
    except ValueError:
        n = 0
    return max(1, min(n, 64)) if n > 0 else max(1, min(4, os.cpu_count() or 1))


def decoded(fn: Callable, items: Sequence, *, depth: int = 16, threads: int | None = None) -> Iterator[tuple]:
    """``(item, fn(item))`` for each item in order, ``fn`` running on a pool of threads at most
    ``depth`` items ahead of the consumer (memory stays bounded by ``depth`` decoded inputs).
    An exception from ``fn`` is raised at its item's turn.
    """
    items = list(items)
    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=min(threads or decode_threads(), len(items)))
    try:
        futures: deque = deque()
        nxt = 0
        while nxt < len(items) and len(futures) < max(1, depth):
            futures.append(pool.submit(fn, items[nxt]))
            nxt += 1
        for item in items:
            result = futures.popleft().result()
            if nxt < len(items):
                futures.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield item, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ImageExtractor:
    """Images -> feature rows through one session (the extractor every image task uses).

    Items are labelled samples (with ``path`` and ``digest``) or plain paths; rows follow them.
    """

    def __init__(self, session, preprocess: PreprocessConfig, model_path: str | Path):
        self.session = session
        self.preprocess = preprocess
        self.model_path = Path(model_path)
        self._key: str | None = None

    @property
    def cache_key(self) -> str:
        if self._key is None:
            self._key = session_key(self.session, self.model_path, self.preprocess)
        return self._key

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
        """Feature vectors of ``items`` (rows in order), from the cache where possible.

        Args:
            cache: where vectors are kept between runs (keyed by the file's sha256 and ``view``).
            view: 0 for the plain image, k > 0 for the k-th deterministic augmented view.
            skipped: when a list is given, unreadable images are recorded in it as ``(path, reason)``
                and left out (rows follow the readable items) instead of raising :class:`DataError`.
        """
        paths = [Path(getattr(i, "path", i)) for i in items]
        bad: dict[int, str] = {}
        if items and hasattr(items[0], "digest"):
            digests = [i.digest for i in items]
        elif cache is None and not view:
            # Nothing is looked up or seeded by content: reading every file once more only to hash
            # it cost ~2 ms a 5 MP frame, before any decoding could start. A missing file fails
            # in its decode, with the same one-line reason.
            digests = [""] * len(paths)
        else:
            digests = [_digest_or_reason(p, i, bad, skipped) for i, p in enumerate(paths)]
        out: list[np.ndarray | None] = [
            None if i in bad else (cache.get(d, view) if cache else None) for i, d in enumerate(digests)
        ]
        todo = [i for i, v in enumerate(out) if v is None and i not in bad]

        def load(i: int):
            try:
                return load_input(paths[i], self.preprocess, digest=digests[i], view=view)
            except DataError as exc:
                if skipped is None:
                    raise
                bad[i] = str(exc).split(": ", 1)[-1]
                return None

        bar = progress(len(todo), desc=desc, quiet=quiet)
        idx: list[int] = []
        ready: list[np.ndarray] = []

        def run() -> None:
            feats = self.session(np.stack(ready))
            for i, vec in zip(idx, feats.reshape(len(idx), -1).astype(np.float32, copy=False)):
                out[i] = vec
                if cache:
                    cache.put(digests[i], view, vec)
            bar.update(len(idx))
            idx.clear()
            ready.clear()

        # Decoding runs up to two batches ahead on a few threads (Pillow releases the GIL) while the
        # runtime works on the batch before. Batches stay full-sized: handing the model whatever was
        # decoded (batches of 1, 3, 7 ...) made OpenVINO re-plan for every new shape (measured:
        # 35 ms an image against 12-19 at a fixed batch). A graph that quantizes activations at run
        # time gets one image per call, so its rows do not depend on their neighbours.
        if not getattr(self.session, "rows_independent", True):
            batch_size = 1
        for i, x in decoded(load, todo, depth=2 * batch_size):
            if x is not None:
                idx.append(i)
                ready.append(x)
            if len(ready) >= batch_size:
                run()
        if ready:
            run()
        bar.close()
        if bad and skipped is not None:
            skipped.extend((paths[i], bad[i]) for i in sorted(bad))
        rows = [v for i, v in enumerate(out) if i not in bad and v is not None]
        return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, 0), np.float32)

    def inputs(self, items: Sequence) -> np.ndarray:
        """The model's input batch for ``items`` (for running the fused model on them)."""
        paths = [Path(getattr(i, "path", i)) for i in items]
        return np.stack([x for _, x in decoded(lambda p: load_input(p, self.preprocess), paths)])


def _digest_or_reason(path: Path, i: int, bad: dict, skipped) -> str:
    """The file's sha256, or (with a ``skipped`` list) "" and the reason recorded in ``bad``."""
    try:
        return file_digest(path)
    except OSError as exc:
        if skipped is None:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        bad[i] = f"cannot read ({exc.strerror or exc})"
        return ""


def extract_features(paths: Sequence[Path], *, session, preprocess: PreprocessConfig, cache=None, **kw) -> np.ndarray:
    """Feature vectors of image files through ``session`` (see :meth:`ImageExtractor.features`)."""
    return ImageExtractor(session, preprocess, "").features(list(paths), cache=cache, **kw)
