"""The device side: load a bundle and answer with numpy, Pillow (or tokenizers) and the bundle's runtime.

No torch, no timm, no network (``tests/cli/test_no_torch.py`` runs this where torch cannot
import). One loader for every task: the bundle's manifest names its task, and the task's
predictor answers (classes with confidences and "unknown"; defect scores, verdicts and heat maps).
A head version written by ``adapt`` is used at once.
"""

from __future__ import annotations

from pathlib import Path

from .. import tasks
from ..core.backbone import TEXT
from ..core.bundle import Bundle, load_bundle


def load_predictor(
    bundle: Bundle | str | Path,
    *,
    device: str | None = None,
    threads: int | None = None,
    head_version: int | None = None,
):
    """A bundle ready to answer: ``.predict(inputs)`` and ``.evaluate(data)``, whatever its task.

    Args:
        bundle: a bundle directory or a loaded :class:`Bundle`.
        device: OpenVINO device override (``CPU``, ``NPU``, ``GPU``, ``AUTO``).
        threads: intra-op threads (default: every core this process may use).
        head_version: a version other than the current one.

    Raises:
        BundleError: not a bundle, damaged, or of a task this edgetl does not know.
        TrustError: a trust policy is in force and refuses the bundle.

    Example:
        >>> p = load_predictor("parts.bundle")  # doctest: +SKIP
        >>> [r.label for r in p.predict(["line/cam0.jpg"], top_k=3)]  # doctest: +SKIP
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return tasks.for_bundle(b).predictor(b, device=device, threads=threads, head_version=head_version)


def deployment(bundle: Bundle) -> dict:
    """What a device needs for this bundle: the pip install line, and which files an app reads.

    ``edgetl predict`` / ``adapt`` read ``backbone.*`` and the head files (an update retrains the
    head on backbone features and fuses a new single-file model); an app that only infers can ship
    the single-file model alone, which holds the backbone a second time.
    """
    m = bundle.manifest
    extras = (["openvino"] if m["runtime"] == "openvino" else []) + (
        ["text"] if m["backbone"].get("preprocess", {}).get("kind") == TEXT else []
    )
    pip = "pip install 'edgetl" + (f"[{','.join(extras)}]" if extras else "") + "'"
    fused = m["models"]["fused"]
    app = (
        [fused]
        + ([str(Path(fused).with_suffix(".bin"))] if fused.endswith(".xml") else [])
        + ([m["models"]["tokenizer"]] if "tokenizer" in m["models"] else [])
    )
    return {
        "install": pip,
        "runtime": m["runtime"],
        "app_files": app,
        "edgetl_files": "all (predict / eval / adapt / rollback use backbone.*, heads/ and the rest)",
    }
