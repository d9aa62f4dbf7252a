"""``fit``: data -> frozen backbone -> target model -> features -> head -> bundle, for every task.

Each stage hands typed data to the next (the task's dataset, :class:`ExportedBackbone`,
:class:`ConvertedModel`, the task's :class:`Trained`, :class:`Bundle`); what differs between
classifying images, classifying text and finding defects is asked of the task
(:mod:`edgetl.tasks.base`). Everything expensive is cached under the cache directory, keyed by
content:

* the FP32 ONNX export, by (architecture, weights sha256, opset) — a hit needs no torch;
* the converted model, by (FP32 model, target settings, calibration items);
* features, by (item sha256, model file sha256, preprocessing, view, numerics).

So a second ``fit`` that only changes the head runs no backbone at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, tasks
from ..core.bundle import Bundle, BundleWriter, check_out_dir
from ..core.diagnostics import leakage_message, near_duplicates, near_duplicates_across_folds
from ..core.features import FeatureCache, default_cache_dir
from ..core.fuse import check_parity, fuse, model_files
from ..core.gate import NOT_APPLICABLE, GateDecision, enforce
from ..core.preprocess import Roi
from ..core.sessions import default_threads, open_session, time_calls
from ..core.targets import Target, load_target
from ..errors import ConfigError
from .convert import ConvertedModel, Restore, converted_model
from .options import FitOptions

log = logging.getLogger("edgetl")


@dataclass
class FitResult:
    """What ``fit`` produced: the bundle, its figures, the full report, the data and timings."""

    bundle: Bundle
    metrics: dict
    report: dict
    data: Any
    timings: dict
    task: Any = None


def resolve_target(options: FitOptions, task) -> Target:
    """The profile (the task's default when none is named) with the overrides applied."""
    t = load_target(options.target or task.default_target).with_overrides(
        precision=options.precision, runtime=options.runtime
    )
    if options.calibration_size is not None:
        t = dataclasses.replace(
            t, quantization=dataclasses.replace(t.quantization, calibration_size=options.calibration_size)
        )
    return task.prepare_target(t)


def measure_latency(session, shape: tuple[int, ...], *, runs: int = 20) -> dict:
    """Batch-1 latency of a session on random input: median and p90 in ms after a warm-up."""
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    return {**time_calls(lambda: session(x), runs=runs), "float_precision": session.float_precision}


def shipped_latency(model: Path, target: Target, shape: tuple[int, ...]) -> dict:
    """Batch-1 latency of a model on this host's own kernels (never the exact-INT8 emulation fit
    may train on), measured once per model file and host and kept beside the model in the cache,
    so a second fit with another head does not time the backbone again."""
    host = hashlib.sha256(f"{platform.node()}|{platform.machine()}|{platform.processor()}|{default_threads()}".encode())
    path = model.parent / f"latency-{host.hexdigest()[:12]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    session = open_session(
        model,
        runtime=target.runtime,
        device=target.device,
        providers=list(target.providers),
        float_precision=target.session_precision,
    )
    latency = measure_latency(session, shape, runs=10)
    try:
        path.write_text(json.dumps(latency))
    except OSError:  # a read-only cache still gives the figure
        pass
    return latency


@dataclass
class _Run:
    """One fit in flight: what every stage reads."""

    task: Any
    target: Target
    data: Any
    exported: Any
    options: FitOptions
    cache_root: Path
    timings: dict = field(default_factory=dict)
    backbone_runs: int = 0

    def lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round(now - since, 3)
        return now

    def train(self, model: Path, *, runtime: str, device: str, simulate: bool, precision: str, like=None):
        ext = self.task.extractor(
            model,
            self.exported,
            runtime=runtime,
            device=device,
            providers=["CPUExecutionProvider"],
            simulate=simulate,
            float_precision=precision,
        )
        cache = FeatureCache(self.cache_root, ext.cache_key)
        trained = self.task.train(ext, self.data, self.options, cache, like=like)
        self.backbone_runs += trained.backbone_runs
        return trained, ext

    def train_shipped(self, shipped: ConvertedModel):
        t = self.target
        simulate = t.fit_features == "simulated" and t.precision == "int8"
        return self.train(
            shipped.path, runtime=t.runtime, device=t.device, simulate=simulate, precision=t.session_precision
        )

    def reference(self, trained):
        """The same pipeline on the FP32 model in ONNX Runtime: what conversion costs. None when the
        shipped model *is* that model, or the reference is off."""
        t = self.target
        if not self.options.reference or (t.precision == "fp32" and t.runtime == "onnxruntime"):
            return None, None
        return self.train(
            self.exported.path, runtime="onnxruntime", device="CPU", simulate=False, precision="f32", like=trained
        )


def _roi(text: str | None, task) -> Roi | None:
    if not text:
        return None
    if task.reads_texts:
        raise ConfigError(f"--roi {text}: a region of interest is for images; the {task.name} task reads texts")
    return Roi.load(text)


def fit(
    data: str | Path, out: str | Path, *, options: FitOptions = FitOptions(), force: bool = False, signer=None
) -> FitResult:
    """Adapt a pretrained backbone to the labelled data in ``data`` and write a bundle to ``out``.

    Args:
        data: an image folder, ``train``/``val`` pair or CSV manifest; a CSV / TSV / JSONL of
            texts; a folder of good images (``DATA/train/good``): the task is told or detected.
        out: bundle directory to create (refused if non-empty unless ``force``).
        options: task, backbone, head, target, precision, split, cache ...
        force: replace an existing bundle at ``out`` (atomically; the old one stays until the new one is
            whole). Only an edgetl bundle is ever replaced: never the data, nor a folder that is not a bundle.
        signer: a :class:`edgetl.core.signing.SigningKey` that signs the release (``--sign``).

    Raises:
        DataError: bad dataset.  ConfigError: bad option or profile.  BundleError: a bad ``out``.
        GateError: the converted model is shown to lose more than the profile allows (unless
            ``allow_drop``), or the fused model disagrees with backbone + head.

    Example:
        >>> r = fit("parts/", "parts.bundle", options=FitOptions(head="mlp"))  # doctest: +SKIP
        >>> r.metrics["accuracy"]  # doctest: +SKIP
    """
    from ..export import export_backbone, resolve

    out = Path(out)
    check_out_dir(out, force=force, data=data)  # fail before any work, not after minutes of it
    t0 = time.perf_counter()
    task = tasks.for_data(data, task=options.task, head=_head_kind(options.head))
    roi = _roi(options.roi, task)  # a malformed region fails before any work
    options = dataclasses.replace(
        options,
        task=task.name,
        head=task.head_config(options.head),
        head_auto=options.head_auto or _head_kind(options.head) is None,
    )
    target = resolve_target(options, task)
    kind = task.backbone_family
    cache_root = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    choice = None
    if options.backbone == "auto":
        options, choice = _auto_backbone(data, options, task, target, cache_root)
    resolve(options.backbone, kind)  # a typo in a name fails now, before the data is read
    run = _Run(task, target, None, None, options, cache_root)
    run.data = task.load_data(Path(data), options, cache_root)
    t0 = run.lap("scan", t0)
    patch = getattr(options.head, "reductions", None) if task.backbone_kind == "image-patch" else None
    run.exported = task.backbone_view(
        export_backbone(
            options.backbone,
            kind=task.backbone_kind,
            weights=options.weights,
            cache_dir=cache_root,
            opset=target.opset,
            patch_reductions=patch,
            exporter=options.exporter,
            patch_pooled=bool(getattr(options.head, "pooled", False)),
        )
    )
    if roi is not None:
        run.exported = run.exported.with_preprocess({**run.exported.preprocess, "roi": roi.to_dict()})
    t0 = run.lap("export", t0)
    calibration = task.calibration(run.data, target, run.exported, options.seed) if target.precision == "int8" else None
    shipped = converted_model(
        run.exported, target, cache_root, calibration, quiet=options.quiet, mode=options.quantization
    )
    t0 = run.lap("convert", t0)
    trained, extractor = run.train_shipped(shipped)
    t0 = run.lap("features+head", t0)
    reference, ref_extractor = run.reference(trained)
    ref, decision = (
        task.gate(trained, reference, target.accuracy_tolerance)
        if reference is not None
        else (
            {},
            GateDecision(
                task.gate_metric,
                target.accuracy_tolerance,
                0,
                method="the shipped model is the reference",
            ),
        )
    )
    if target.precision == "fp32":
        # Nothing was quantized: FP32 against FP32 differs by runtime rounding only, and a gate over
        # that noise would call small validation sets "inconclusive" about a conversion never made.
        decision = dataclasses.replace(
            decision,
            verdict=NOT_APPLICABLE,
            needed_items=None,
            method="no quantization: the shipped model is FP32 like the reference"
            + (f" ({target.runtime} vs onnxruntime; the figures show how they agree)" if reference else ""),
        )
    t0 = run.lap("reference", t0)
    gate, after = decision.to_dict(), ""
    if (
        decision.verdict == "refused"
        and task.accuracy_control
        and target.quantization.accuracy_control
        and target.precision == "int8"
        and reference is not None
        and (run.data.val or run.data.train)
    ):
        shipped, trained, new_extractor, ref, decision, gate, after = _accuracy_control(
            run, shipped, trained, reference, ref, decision
        )
        extractor = new_extractor or extractor
        t0 = run.lap("accuracy_control", t0)
    leak = _check_split(run, trained)
    check = task.transfer_check(trained, run.data, run.exported, cache_root)
    if check and check["warn"]:
        log.warning("%s", check["message"])
    enforce(
        decision,
        model=f"{target.precision} {'encoder' if task.reads_texts else 'model'}",
        target=target.name,
        items=task.items,
        allow=options.allow_drop,
        after=after,
    )

    bundle, report = _write(
        run,
        out,
        force=force,
        data=data,
        signer=signer,
        shipped=shipped,
        trained=trained,
        extractor=extractor,
        ref_extractor=ref_extractor,
        report={
            "reference": ref,
            "gate": gate,
            "split": getattr(run.data, "split", {}),
            "leakage": leak,
            **({"backbone_choice": choice} if choice else {}),
            **({"transfer_check": check} if check else {}),
        },
    )
    run.lap("bundle", t0)
    run.timings["backbone_images" if task.items == "images" else "backbone_texts"] = run.backbone_runs
    return FitResult(bundle, trained.metrics, report, run.data, run.timings, task)


# The packages whose versions change a bundle's numbers (constraints/bench.txt pins them).
NUMERICS_STACK = ("onnxruntime", "openvino", "nncf", "numpy", "torch", "timm")


def stack_versions() -> dict[str, str | None]:
    """The installed version of each package of :data:`NUMERICS_STACK` (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in NUMERICS_STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _auto_backbone(data, options: FitOptions, task, target: Target, cache_root: Path):
    """``--backbone auto``: the backbone :func:`edgetl.pipeline.rank.rank` chooses on the training
    split (cheapest not shown worse than the best, within the target's latency budget)."""
    from .rank import rank

    if not task.ranks_backbones:
        raise ConfigError(
            f"--backbone auto ranks image classifiers on labelled images; for {task.name} data name a backbone"
        )
    choice = rank(
        data,
        target=target,
        budget_ms=target.latency_budget_ms or None,
        seed=options.seed,
        val_split=options.val_split,
        group_by=options.group_by,
        cache_dir=cache_root,
        roi=options.roi,
        quiet=options.quiet,
    )
    return dataclasses.replace(options, backbone=choice["choice"]), choice


def _head_kind(head) -> str | None:
    if head is None or isinstance(head, str):
        return head
    return head.get("kind") if isinstance(head, dict) else getattr(head, "kind", None)


def _accuracy_control(run: _Run, shipped, trained, reference, ref, decision):
    """Plain PTQ is shown to miss the tolerance: let NNCF put the most damaging layers back in
    float, scored by the FP32 head's accuracy on the validation items (what the gate measures).
    Only a shown excess gets here: an inconclusive drop could not be changed."""
    task, target, options = run.task, run.target, run.options
    log.warning(
        "%s: %s; trying accuracy-controlled quantization (at most %d s)",
        target.name,
        decision.describe(),
        target.quantization.accuracy_control_budget_s,
    )
    key = hashlib.sha256(
        "|".join(
            [s.digest for s in run.data.train]
            + ["val"]
            + [s.digest for s in run.data.val]
            + [json.dumps(options.to_dict()["head"], sort_keys=True), str(options.augment)]
        ).encode()
    ).hexdigest()
    ext = task.extractor(run.exported.path, run.exported, runtime="onnxruntime", device="CPU", providers=None)
    scored = run.data.val or run.data.train  # see the task's accuracy_score
    restore = Restore(
        lambda: ext.inputs(scored), task.accuracy_score(reference, run.data), target.accuracy_tolerance / 100.0, key
    )
    calibration = task.calibration(run.data, target, run.exported, options.seed)
    restored = converted_model(run.exported, target, run.cache_root, calibration, restore=restore, quiet=options.quiet)
    control = restored.info.get("accuracy_control", {})
    gate = {"plain_ptq": decision.to_dict(), "accuracy_control": control}
    if control.get("float_layers"):
        trained, extractor = run.train_shipped(restored)
        ref, decision = task.gate(trained, run.reference(trained)[0], target.accuracy_tolerance)
        after = (
            f" even with {len(control['float_layers'])} layers kept in float by accuracy-controlled "
            f"quantization (plain INT8 lost {gate['plain_ptq']['drop_pp']:.2f})"
        )
        return restored, trained, extractor, ref, decision, {**decision.to_dict(), **gate}, after
    why = control.get("stopped") or "it kept no layer in float"
    log.warning("accuracy control changed nothing (%s): the INT8 model is plain quantization's", why)
    return (
        shipped,
        trained,
        None,
        ref,
        decision,
        {**decision.to_dict(), **gate},
        f"; accuracy control changed nothing ({why})",
    )


def _check_split(run: _Run, trained) -> dict:
    """The leakage check and the classes the validation figure does not cover (classification)."""
    f, data = trained.features, run.data
    if not run.task.leakage_check:
        return {}
    names = [getattr(s, "path", None) or getattr(s, "where", "") for s in data.train]
    grouped = data.split.get("method") == "grouped" or "grouped" in getattr(f.get("plan"), "method", "")
    leak = {}
    if f.get("plan") is not None and f["plan"].folds:
        leak = near_duplicates_across_folds(f["X_tr"][: f["n_train"]], f["plan"].fold, names=names)
        if leak["warn"]:
            log.warning("%s", leakage_message(leak, grouped=grouped, items=run.task.items))
    if len(f["X_va"]):
        leak = {
            **near_duplicates(
                f["X_tr"][: f["n_train"]],
                f["X_va"],
                names_train=names,
                names_val=[getattr(s, "path", None) or getattr(s, "where", "") for s in data.val],
            ),
            **({"out_of_fold": leak} if leak else {}),
        }
        if leak["warn"]:
            log.warning("%s", leakage_message(leak, grouped=grouped, items=run.task.items))
    if data.split.get("classes_without_val"):
        log.warning(
            "classes %s have too few groups to hold one out: the validation figure does not cover them",
            ", ".join(data.split["classes_without_val"]),
        )
    elif data.val and trained.metrics.get("classes_missing"):
        log.warning(
            "classes %s have no validation %s (too few to hold one out): the validation figure does not cover them",
            ", ".join(map(repr, trained.metrics["classes_missing"])),
            run.task.items[:-1],
        )
    return leak


def _write(
    run: _Run, out: Path, *, force, data, signer, shipped, trained, extractor, ref_extractor, report: dict
) -> tuple[Bundle, dict]:
    """The bundle: backbone, the task's release files, the fused model (checked against backbone +
    head), the report and the manifest, committed in one rename."""
    task, target, exported, options = run.task, run.target, run.exported, run.options
    with BundleWriter(out, force=force, data=data, signer=signer) as w:
        backbone_name = f"backbone{shipped.path.suffix}"
        for src in shipped.files():
            shutil.copyfile(src, w.dir / f"backbone{src.suffix}")
        (w.dir / "heads").mkdir()
        trained.head.save(w.dir / "heads" / "v1.npz")
        release = task.write_release(w.dir, trained, run.data, options, exported)
        meta = {
            "edgetl_version": __version__,
            "task": task.name,
            "labels": release["manifest"]["labels"],
            "preprocess": exported.preprocess,
            "backbone": exported.name,
            "precision": target.precision,
            "target": target.name,
            "head_version": 1,
            **release.get("fused_meta", {}),
        }
        fused_path = fuse(w.dir / backbone_name, trained.head, w.dir / "model", meta=meta)
        if target.tensorrt is not None:
            from ..core.tensorrt import write_build_scripts

            write_build_scripts(
                w.dir,
                fused=fused_path.name,
                workspace_mb=target.tensorrt.workspace_mb,
                level=target.tensorrt.builder_optimization_level,
            )
        simulate = target.fit_features == "simulated" and target.precision == "int8"
        fused_session = open_session(
            fused_path,
            runtime=target.runtime,
            device=target.device,
            simulate=simulate,
            float_precision=target.session_precision,
        )
        par, value, what = task.parity(fused_session, trained, run.data, exported)
        check_parity(par, value, what, allow=options.allow_drop)
        sizes = {
            "backbone_bytes": sum(p.stat().st_size for p in shipped.files()),
            "fp32_bytes": exported.path.stat().st_size,
            "fused_bytes": sum(p.stat().st_size for p in model_files(fused_path)),
        }
        speed = task.speed(extractor, ref_extractor, run.data) or {}
        if "latency_batch1" not in speed:  # image tasks: the backbone, and the single-file model
            size = exported.image_preprocess.input_size
            native = open_session(
                fused_path,
                runtime=target.runtime,
                device=target.device,
                providers=list(target.providers),
                float_precision=target.session_precision,
            )
            speed = {
                "latency_batch1": shipped_latency(shipped.path, target, (3, size, size)),
                "fused_latency_batch1": measure_latency(native, (3, size, size), runs=10),
                **speed,
            }
        report = {
            "task": task.name,
            "precision": target.precision,
            "runtime": target.runtime,
            "target": target.name,
            "conversion": shipped.info,
            **report,
            "fused_parity": par,
            "numerics": {
                "features": trained.session.describe(),
                "fused": fused_session.describe(),
                "target_float_precision": target.session_precision,
                # what made these numbers: a figure is compared with another made on the same stack
                "stack": stack_versions(),
            },
            **({"target_adjusted": list(target.adjusted)} if target.adjusted else {}),
            **speed,
            "size": sizes,
            **release.get("report", {}),
            "timings_s": run.timings,
        }
        (w.dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        sizes["bundle_bytes"] = sum(p.stat().st_size for p in w.dir.rglob("*") if p.is_file())
        entry = {
            "version": 1,
            "file": "heads/v1.npz",
            "fused": fused_path.name,
            "source": "fit",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **release["entry"],
        }
        manifest_extra = dict(release["manifest"])
        metrics = manifest_extra.pop("metrics", {})
        if report["reference"]:
            metrics["reference"] = report["reference"]
        training = {
            "data": str(Path(data).resolve()),
            "layout": run.data.layout,
            "counts": run.data.counts(),
            "options": options.to_dict(),
            "skipped": len(run.data.skipped),
        }
        if getattr(run.data, "columns", None):
            training["columns"] = run.data.columns
        manifest = {
            "edgetl_version": __version__,
            "task": task.name,
            **manifest_extra,
            "backbone": exported.to_dict(),
            "target": target.to_dict(),
            "precision": target.precision,
            "runtime": target.runtime,
            "models": {"backbone": backbone_name, "fused": fused_path.name, **release.get("models", {})},
            "head": {"current": 1, "versions": [entry]},
            "metrics": metrics,
            "training": training,
        }
        bundle = w.commit(manifest)
    return bundle, report
