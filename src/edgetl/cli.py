"""The ``edgetl`` command line: parse, call the library, print (human text or one JSON object).

Thin on purpose: every command is a few lines over a library call. Heavy imports (torch, NNCF,
OpenVINO) happen inside the library functions a command calls, so ``edgetl --help`` is instant.
A user mistake (:class:`edgetl.errors.EdgetlError`) prints ``error: ...`` on one line and exits
non-zero; with ``--json`` stdout carries exactly one JSON object, and messages go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EdgetlError

log = logging.getLogger("edgetl")


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    log.propagate = False
    # NNCF and OpenVINO log INFO lines and progress bars of their own; keep the terminal readable.
    for noisy in ("nncf", "openvino"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def handle_errors(fn):
    """Turn EdgetlError into ``error: message`` + its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgetlError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory; lower EDGETL_MAX_MEGAPIXELS or --batch sizes, or free memory", err=True)
            sys.exit(2)
        except OSError as exc:
            # The machine, not edgetl: a full disk, a file-size limit, a read-only or vanished folder.
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            click.echo(f"error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror}; "
                       "nothing was changed", err=True)
            sys.exit(2)

    return wrapper


import errno as _errno

_ENVIRONMENT_ERRNOS = {_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG, _errno.EROFS, _errno.EACCES, _errno.EPERM,
                       _errno.EBUSY, _errno.ENOENT, _errno.EIO, _errno.ENAMETOOLONG}


def _one_line(exc: Exception) -> str:
    """Messages are one line: control characters (a newline in a file name) are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))


def safe(text) -> str:
    """A path or label for a line of text output: control characters escaped, so a file name with
    a newline cannot forge a line."""
    return _one_line(str(text))


def emit(obj: dict, as_json: bool, text: str) -> None:
    """Print either the JSON object (machines) or the text (people) on stdout."""
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        click.echo(text)


def warn_skipped(skipped: list, *, quiet: bool) -> None:
    """One warning that counts and names the files that were skipped."""
    if skipped and not quiet:
        names = ", ".join(f"{safe(p)} ({safe(r)})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        click.echo(f"warning: skipped {len(skipped)} unreadable file(s): {names}{more} (--strict makes this fatal)", err=True)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or warnings.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetl")
@click.option("--trust", type=click.Path(path_type=Path), envvar="EDGETL_TRUST",
              help="Trust policy (TOML of public keys and what each may do): refuse bundles and head versions "
                   "not signed accordingly.  [env: EDGETL_TRUST]")
def main(trust) -> None:
    """Adapt a frozen pretrained backbone to your images and ship it to an edge device.

    \b
    Typical use:
      edgetl example surfaces data/          # a small built-in dataset to try things on
      edgetl fit data/ --out parts.bundle    # train a head, quantize, export, verify
      edgetl predict parts.bundle img.jpg    # on the device: no torch needed
      edgetl adapt parts.bundle new/         # on the device: learn from new labelled images

    \b
    Exit codes: 0 ok, 2 a usage or input problem (one line says which), 3 a gate refused,
    4 another process is writing the bundle (--wait), 5 a signature check refused it.
    """
    import os

    if trust:
        os.environ["EDGETL_TRUST"] = str(trust)  # library calls below read the policy from here


# ----------------------------------------------------------------------------------------- fit
@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              help="efficientnet_lite0/1/2 or any timm model name.")
@click.option("--weights", type=click.Path(path_type=Path), help="Backbone weights (.safetensors or .pth state dict).")
@click.option("--head", "head_kind", type=click.Choice(["linear", "mlp", "prototype", "padim", "patchcore"]),
              help="Head trained on the frozen features: linear (default), mlp, prototype; "
                   "with --task anomaly: patchcore (default) or padim.")
@click.option("--l2", type=float, help="L2 regularisation (default: chosen on the validation split).")
@click.option("--hidden", type=int, default=256, show_default=True, help="Hidden units of the mlp head.")
@click.option("--epochs", type=int, default=300, show_default=True, help="Optimizer iterations for linear/mlp heads.")
@click.option("--target", "-t", help="Target profile name (see `edgetl targets`) or a .toml file.  [default: openvino-cpu]")
@click.option("--precision", type=click.Choice(["int8", "bf16", "fp16", "fp32"]), help="Override the target's precision.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), help="Override the target's runtime.")
@click.option("--val", type=click.Path(path_type=Path), help="Separate validation folder or CSV.")
@click.option("--val-split", type=float, default=0.2, show_default=True, help="Fraction held out per class when no --val.")
@click.option("--group-by", help="Keep groups on one side of the split: a CSV column, 'folder' (DATA/<class>/<group>/), "
              "'regex:PATTERN' (on file names) or 'none'.  [default: a group column or <class>/<group>/ folders if present]")
@click.option("--augment", type=int, default=0, show_default=True, help="Augmented views cached per training image.")
@click.option("--calibration-size", type=int, help="INT8 calibration images (default: the target's, 128).")
@click.option("--allow-drop", is_flag=True, help="Write the bundle even if quantization loses more than the target allows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the head and calibration.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), help="Cache directory  [default: $EDGETL_CACHE or ~/.cache/edgetl]")
@click.option("--strict", is_flag=True, help="Make unreadable image files fatal instead of skipped.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out (atomically; only a bundle).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), envvar="EDGETL_SIGN_KEY",
              help="Sign the bundle's release with this private key (from `edgetl keygen`).  [env: EDGETL_SIGN_KEY]")
# --- text (issue 7) ---
@click.option("--task", type=click.Choice(["classify", "text", "anomaly"]),
              help="classify (images), text, or anomaly (good images only: defect detection); default: text for "
                   "a CSV/TSV/JSONL file with a text column, anomaly for a DATA/train/good (MVTec) folder.")
@click.option("--text-column", help="Text column of a text dataset (default: text, sentence, content, ...).")
@click.option("--label-column", help="Label column of a text dataset (default: label, class, category, ...).")
# --- end text ---
@json_option
@quiet_option
@handle_errors
def fit(data, out, backbone, weights, head_kind, l2, hidden, epochs, target, precision, runtime, val, val_split,
        group_by, augment, calibration_size, allow_drop, seed, cache_dir, strict, force, sign_key, task, text_column,
        label_column, as_json, quiet):
    """Train a head on DATA and write a deployable bundle to --out.

    DATA is an image folder (DATA/<class>/*.jpg), a DATA/train + DATA/val pair, or a CSV with
    path,label columns. The backbone is exported once, converted for the target (INT8 calibrated on
    your training images by default), and the head is trained on the features that converted model
    produces, so it sees exactly what the device will compute.
    """
    _setup_logging(quiet)
    from .fit import FitOptions, fit as run_fit
    from .heads import HeadConfig
    from .signing import signing_key_from

    signer = signing_key_from(sign_key)
    # --- anomaly (issue 6): good-only data goes to edgetl.anomaly ---
    from . import anomaly

    if anomaly.wants_anomaly(data, task, head_kind):
        result = anomaly.fit_anomaly(data, out, force=force, signer=signer, options=anomaly.AnomalyOptions(
            head=anomaly.AnomalyConfig(kind=head_kind or "patchcore", seed=seed), backbone=backbone,
            weights=str(weights) if weights else None, target=target, precision=precision, runtime=runtime,
            val_split=val_split, seed=seed, cache_dir=str(cache_dir) if cache_dir else None, strict=strict,
            calibration_size=calibration_size, allow_drop=allow_drop, quiet=quiet or as_json))
        warn_skipped(result.data.skipped, quiet=quiet)
        return emit(anomaly.fit_summary(result), as_json, anomaly.fit_text(result))
    head_kind = head_kind or "linear"
    # --- end anomaly ---

    # --- text (issue 7): text datasets go to edgetl.text ---
    from . import text_cli

    if text_cli.wants_text(data, task):
        summary, text = text_cli.fit(
            data, out, backbone=backbone, head=HeadConfig(kind=head_kind, l2=l2, hidden=hidden, epochs=epochs, seed=seed),
            target=target, precision=precision, runtime=runtime, val=val, val_split=val_split, seed=seed,
            cache_dir=cache_dir, strict=strict, calibration_size=calibration_size, allow_drop=allow_drop, force=force,
            quiet=quiet or as_json, text_column=text_column, label_column=label_column, signer=signer)
        warn_skipped([(s["row"], s["reason"]) for s in summary["skipped"]], quiet=quiet)
        return emit(summary, as_json, text)
    # --- end text ---

    opts = FitOptions(
        backbone=backbone, weights=str(weights) if weights else None,
        head=HeadConfig(kind=head_kind, l2=l2, hidden=hidden, epochs=epochs, seed=seed),
        target=target, precision=precision, runtime=runtime, val=str(val) if val else None, val_split=val_split,
        group_by=group_by, augment=augment, seed=seed, cache_dir=str(cache_dir) if cache_dir else None, strict=strict,
        calibration_size=calibration_size, allow_drop=allow_drop, quiet=quiet or as_json,
    )
    result = run_fit(data, out, options=opts, force=force, signer=signer)
    warn_skipped(result.dataset.skipped, quiet=quiet)
    emit(_fit_summary(result), as_json, _fit_text(result))


def _fit_summary(result) -> dict:
    r = result.report
    return {
        "bundle": str(result.bundle.path),
        "labels": result.bundle.labels,
        "counts": result.dataset.counts(),
        "skipped": [{"path": str(p), "reason": why} for p, why in result.dataset.skipped],
        "val": result.metrics,
        "train_accuracy": r["train_accuracy"],
        "target": r["target"], "precision": r["precision"], "runtime": r["runtime"],
        "reference": r["reference"], "gate": r["gate"], "latency_batch1": r["latency_batch1"], "size": r["size"],
        "timings_s": result.timings,
    }


def _fit_text(result) -> str:
    from .report import format_metrics

    r = result.report
    lines = [f"bundle    {result.bundle.path}  ({r['target']}: {r['precision']} on {r['runtime']})"]
    n_tr = sum(c["train"] for c in result.dataset.counts().values())
    n_va = sum(c["val"] for c in result.dataset.counts().values())
    split = r.get("split", {})
    how = {"grouped": f"grouped split, {split.get('val_groups')} of {split.get('groups')} groups held out",
           "explicit": "your validation set", "stratified": "stratified random split"}.get(split.get("method"), "")
    lines.append(f"data      {len(result.bundle.labels)} classes, {n_tr} train / {n_va} val images ({how})")
    from .report import gate_lines

    lines += gate_lines(r, "feature cosine", r["reference"].get("feature_cosine_mean"))
    size_mb = r["size"]["backbone_bytes"] / 1e6
    lines.append(f"model     {size_mb:.1f} MB backbone, batch-1 latency {r['latency_batch1']['p50_ms']:.1f} ms (p50, this machine)")
    lines.append(f"time      {sum(v for k, v in result.timings.items() if k != 'backbone_images'):.1f} s "
                 f"({result.timings['backbone_images']} images through a backbone)")
    if result.metrics:
        lines.append("")
        lines.append(format_metrics(result.metrics, title="validation"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- eval
@main.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--device", help="OpenVINO device override (CPU, NPU, GPU, AUTO).")
@click.option("--strict", is_flag=True, help="Make unreadable image files fatal instead of skipped.")
@json_option
@quiet_option
@handle_errors
def eval_cmd(bundle, data, device, strict, as_json, quiet):
    """Accuracy, per-class recall and confusion matrix of BUNDLE on labelled images in DATA."""
    _setup_logging(quiet)
    from .report import format_metrics
    from .runtime import Predictor

    # --- text (issue 7): text bundles evaluate on CSV/TSV/JSONL rows ---
    from . import text_cli

    if text_cli.is_text_bundle_path(bundle):
        m, text, skipped = text_cli.evaluate(bundle, data, strict=strict, device=device)
        warn_skipped(skipped, quiet=quiet)
        return emit(m, as_json, text)
    # --- end text ---
    # --- anomaly (issue 6) ---
    from . import anomaly

    if anomaly.is_anomaly_bundle_path(bundle):
        m = anomaly.AnomalyPredictor(bundle, device=device).evaluate(data, strict=strict)
        warn_skipped([(p["path"], p["reason"]) for p in m["skipped"]], quiet=quiet)
        return emit(m, as_json, anomaly.eval_text(m, title=f"{bundle} on {data} (head v{m['head_version']})"))
    # --- end anomaly ---
    m = Predictor(bundle, device=device).evaluate(data, quiet=quiet or as_json, strict=strict)
    warn_skipped([(p["path"], p["reason"]) for p in m["skipped"]], quiet=quiet)
    emit(m, as_json, format_metrics(m, title=f"{bundle} on {data} (head v{m['head_version']})"))


# ------------------------------------------------------------------------------------- predict
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--top-k", type=int, default=1, show_default=True, help="Classes listed per image.")
# --- text (issue 7) ---
@click.option("--file", "text_file", type=click.Path(path_type=Path), help="Text bundles: classify each line of this file.")
# --- end text ---
@click.option("--threshold", type=float, help="Answer 'unknown' below this confidence (default: the bundle's); "
              "anomaly bundles: the defect score threshold.")
@click.option("--device", help="OpenVINO device override (CPU, NPU, GPU, AUTO).")
# --- anomaly (issue 6) ---
@click.option("--heatmaps", type=click.Path(path_type=Path), help="Anomaly bundles: write heat-map overlays (PNG) here.")
# --- end anomaly ---
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
@json_option
@quiet_option
@handle_errors
def predict(bundle, paths, top_k, threshold, device, text_file, heatmaps, strict, as_json, quiet):
    """Classify image files or folders with BUNDLE (runs without torch).

    For a text bundle, PATHS are the texts themselves; or give --file FILE (one text per line), or
    pipe lines on stdin.
    """
    _setup_logging(quiet)
    from .runtime import Predictor

    # --- text (issue 7): texts from arguments, --file or stdin ---
    from . import text_cli

    if text_cli.is_text_bundle_path(bundle):
        obj, text = text_cli.predict(bundle, [str(p) for p in paths], file=text_file, top_k=top_k,
                                     threshold=threshold, device=device)
        return emit(obj, as_json, text)
    if not paths:
        raise click.UsageError("give one or more image files or folders")
    # --- end text ---
    # --- anomaly (issue 6): good/defect, score and threshold per image ---
    from . import anomaly

    if anomaly.is_anomaly_bundle_path(bundle):
        skipped = None if strict else []
        preds = anomaly.AnomalyPredictor(bundle, device=device).predict(paths, threshold=threshold, heatmaps=heatmaps,
                                                                         skipped=skipped)
        warn_skipped(skipped or [], quiet=quiet)
        return emit({"predictions": [p.to_dict() for p in preds], "skipped": _skipped_json(skipped)}, as_json,
                    anomaly.predict_text(preds))
    # --- end anomaly ---

    skipped = None if strict else []
    preds = Predictor(bundle, device=device).predict(paths, top_k=top_k, threshold=threshold, quiet=quiet or as_json,
                                                     skipped=skipped)
    warn_skipped(skipped or [], quiet=quiet)
    lines = []
    for p in preds:
        alts = "  ".join(f"{safe(l)} {q:.3f}" for l, q in p.top_k[1:])
        lines.append(f"{safe(p.path)}\t{safe(p.label)}\t{p.confidence:.3f}" + (f"\t{alts}" if alts else ""))
    emit({"predictions": [p.to_dict() for p in preds], "skipped": _skipped_json(skipped)}, as_json, "\n".join(lines))


def _skipped_json(skipped) -> list:
    return [{"path": str(p), "reason": r} for p, r in (skipped or [])]


# ------------------------------------------------------------------------------------- export
@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--target", "-t", help="Target profile name or .toml file (default: the run's).")
@click.option("--precision", type=click.Choice(["int8", "bf16", "fp16", "fp32"]), help="Precision of the new bundle.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), help="Runtime of the new bundle.")
@click.option("--data", type=click.Path(path_type=Path), help="Training data, if it moved since the run.")
@click.option("--allow-drop", is_flag=True, help="Write the bundle even if quantization loses more than allowed.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), help="Cache directory.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out (atomically; only a bundle).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), envvar="EDGETL_SIGN_KEY",
              help="Sign the new bundle's release with this private key.  [env: EDGETL_SIGN_KEY]")
@json_option
@quiet_option
@handle_errors
def export(run, out, target, precision, runtime, data, allow_drop, cache_dir, force, sign_key, as_json, quiet):
    """Re-export an existing bundle RUN for another target, precision or runtime.

    Uses the run's recorded data, split, backbone and head settings (the chosen L2 included).
    Cached features make this fast; only the new model's features are computed. The head is
    retrained on the new model's features, so it matches what that device computes.
    """
    _setup_logging(quiet)
    from .bundle import read_manifest

    task = read_manifest(Path(run)).get("task")
    from .signing import signing_key_from

    kw = dict(target=target, precision=precision, runtime=runtime, data=data, allow_drop=allow_drop,
              cache_dir=cache_dir, force=force, quiet=quiet or as_json, signer=signing_key_from(sign_key))
    # --- anomaly (issue 6) ---
    if task == "anomaly":
        from . import anomaly

        result = anomaly.export_anomaly_bundle(run, out, **kw)
        warn_skipped(result.data.skipped, quiet=quiet)
        return emit(anomaly.fit_summary(result), as_json, anomaly.fit_text(result))
    # --- end anomaly ---
    if task == "text":
        from .text import export_text_bundle as export_bundle
    else:
        from .export import export_bundle
    result = export_bundle(run, out, **kw)
    emit(_fit_summary(result), as_json, _fit_text(result))


# ------------------------------------------------------------------------------------ targets
@main.command()
@json_option
@handle_errors
def targets(as_json):
    """List the shipped target profiles (add your own with --target FILE.toml)."""
    from .targets import list_targets

    ts = list_targets()
    width = max(len(t.name) for t in ts)
    text = "\n".join(f"{t.name:<{width}}  {t.description}" for t in ts)
    emit({"targets": [t.to_dict() for t in ts]}, as_json, text)


# ------------------------------------------------------------------------------------ example
@main.command()
@click.argument("name", type=click.Choice(["surfaces", "defects", "tickets"]))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@json_option
@handle_errors
def example(name, out, seed, force, as_json):
    """Write a built-in example dataset to OUT.

    \b
    surfaces  8 classes of material photographs (scikit-image), for classification
    defects   good textures + synthetic scratches, spots, cracks ... (MVTec layout), for --task anomaly
    tickets   maintenance tickets in 5 classes (tickets.csv: text,label,split), for text classification
    """
    from .examples import make_example

    summary = make_example(name, out, seed=seed, force=force)
    emit({"example": name, "out": str(out), **summary}, as_json, f"wrote the {name!r} example to {out}")


# -------------------------------------------------------------------------------------- adapt
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--replace", is_flag=True, help="Train on DATA only: forget the replay memory and classes not in DATA.")
@click.option("--tolerance", type=float, default=5.0, show_default=True,
              help="Allowed accuracy drop on known classes, in percentage points.")
@click.option("--force", is_flag=True, help="Accept the update even if the gate refuses it.")
@click.option("--dry-run", is_flag=True, help="Train and run the gate, but write nothing.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--strict", is_flag=True, help="Make unreadable image files fatal instead of skipped.")
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Seconds to wait for another process writing the bundle (default: refuse at once, exit 4).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), envvar="EDGETL_SIGN_KEY",
              help="Sign the change with this private key (from `edgetl keygen`).  [env: EDGETL_SIGN_KEY]")
@json_option
@quiet_option
@handle_errors
def adapt(bundle, data, replace, tolerance, force, dry_run, seed, strict, wait, sign_key, as_json, quiet):
    """Retrain BUNDLE's head on the device from new labelled images in DATA (no torch).

    DATA is an image folder (DATA/<class>/*.jpg); new class names add classes. The new head is
    trained on DATA plus the bundle's replay exemplars, checked by a gate on held-out images, and
    becomes a new version only if it passes (exit code 3 otherwise; the old head stays current).

    For an anomaly (defect-detection) bundle, DATA is a folder of newly confirmed *good* images
    (DATA/*.png, DATA/good/ or DATA/train/good/): they join the memory bank or the statistics,
    the threshold carries over, and the result is a new version like any other.
    """
    _setup_logging(quiet)
    from .bundle import read_manifest
    from .signing import signing_key_from

    signer = signing_key_from(sign_key)
    task = read_manifest(Path(bundle)).get("task", "classify")
    # --- anomaly (issue 6): DATA holds newly confirmed good images; no labels, so no gate ---
    if task == "anomaly":
        from .anomaly import adapt_anomaly

        if replace:
            raise EdgetlError(f"{bundle}: --replace is for classification bundles; an anomaly bundle only adds good images")
        r = adapt_anomaly(bundle, data, strict=strict, quiet=quiet or as_json, dry_run=dry_run, wait=wait,
                          signer=signer)
        b4, af = r.before, r.after
        mem = r.memory
        text = "\n".join([
            ("dry run: nothing written" if dry_run else f"head v{r.version} is now current in {r.bundle.path}"),
            f"learned       {r.images} good images"
            + (f"; memory bank {mem['patches']} of at most {mem['max_memory']} patches" if "patches" in mem
               else f"; statistics of {mem['images']} images"),
            f"their scores  max {b4['max']:.4g} -> {af['max']:.4g}; over the threshold {b4['over_threshold']} -> "
            f"{af['over_threshold']}",
            f"time          {r.timings['total']:.2f} s",
        ])
        return emit(r.to_dict(), as_json, text)
    # --- end anomaly ---
    if task == "text":
        from .text import adapt_text

        r = adapt_text(bundle, data, replace=replace, force=force, tolerance_pp=tolerance, seed=seed, strict=strict,
                       dry_run=dry_run, wait=wait, signer=signer)
    else:
        from .adapt import adapt as run_adapt

        r = run_adapt(bundle, data, replace=replace, force=force, tolerance_pp=tolerance, seed=seed, strict=strict,
                      dry_run=dry_run, quiet=quiet or as_json, wait=wait, signer=signer)
    warn_skipped(r.skipped, quiet=quiet)
    g = r.gate
    fmt = lambda v: "n/a" if v is None else f"{v:.1%}"
    text = "\n".join([
        ("dry run: nothing written" if dry_run else f"head v{r.version} is now current in {r.bundle.path}"),
        f"labels        {', '.join(r.labels)}" + (f"  (new: {', '.join(r.new_classes)})" if r.new_classes else ""),
        f"known classes {fmt(g['old_known_accuracy'])} -> {fmt(g['new_known_accuracy'])} on held-out data",
        f"new images    {fmt(g['new_holdout_accuracy'])} held-out accuracy ({g['holdout_images']} images)",
        f"gate          {'passed' if g['passed'] else 'FAILED (forced)' if g['forced'] else 'FAILED'}",
        f"time          {r.timings.get('features', 0):.2f} s features, {r.timings.get('train', 0):.2f} s training",
    ])
    emit(r.to_dict(), as_json, text)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--to", "to", type=int, help="Version to make current (default: the previous one).")
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Seconds to wait for another process writing the bundle (default: refuse at once, exit 4).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), envvar="EDGETL_SIGN_KEY",
              help="Sign the change with this private key (from `edgetl keygen`).  [env: EDGETL_SIGN_KEY]")
@json_option
@handle_errors
def rollback(bundle, to, wait, sign_key, as_json):
    """Make an earlier head version of BUNDLE current again (with that version's own thresholds)."""
    from .adapt import rollback as run_rollback
    from .signing import signing_key_from

    b = run_rollback(bundle, to=to, wait=wait, signer=signing_key_from(sign_key))
    thresholds = b.manifest.get("thresholds", {})
    shown = ", ".join(f"{k} threshold {v:g}" for k, v in thresholds.items())
    emit({"bundle": str(b.path), "current": b.head_version, "labels": b.labels, "thresholds": thresholds}, as_json,
         f"head v{b.head_version} is now current in {b.path}" + (f" ({shown}, its own)" if shown else ""))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
@handle_errors
def history(bundle, as_json):
    """List BUNDLE's head versions (the current one marked with *)."""
    from .adapt import history as run_history

    rows = run_history(bundle)
    if rows and "threshold" in rows[0]:  # anomaly bundle: images learned and the threshold per version
        lines = [f"{'':1} {'ver':>3}  {'created':<20}  {'source':<8} {'images':>7}  {'threshold':>10}"]
        for e in rows:
            lines.append(f"{'*' if e['current'] else ' '} {e['version']:>3}  {e['created']:<20}  {e['source']:<8} "
                         f"{e.get('images') or 0:>7}  {e['threshold']:>10.4g}")
        return emit({"versions": rows}, as_json, "\n".join(lines))
    lines = [f"{'':1} {'ver':>3}  {'created':<20}  {'source':<14} {'classes':>7}  {'val/holdout acc':>15}"]
    for e in rows:
        acc = e.get("val_accuracy") if e.get("val_accuracy") is not None else (e.get("gate") or {}).get("new_holdout_accuracy")
        lines.append(f"{'*' if e['current'] else ' '} {e['version']:>3}  {e['created']:<20}  {e['source']:<14} "
                     f"{len(e['labels']):>7}  {('%.1f%%' % (acc * 100)) if acc is not None else 'n/a':>15}")
    emit({"versions": rows}, as_json, "\n".join(lines))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("value", type=float)
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Seconds to wait for another process writing the bundle (default: refuse at once, exit 4).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), envvar="EDGETL_SIGN_KEY",
              help="Sign the change with this private key (from `edgetl keygen`).  [env: EDGETL_SIGN_KEY]")
@json_option
@handle_errors
def threshold(bundle, value, wait, sign_key, as_json):
    """Set the decision threshold of BUNDLE's current head version (kept in the manifest, never
    baked into a graph; every version keeps its own, and a rollback brings back that version's).

    \b
    Classification and text bundles: below VALUE confidence (0..1), predict answers "unknown";
      0 disables it.
    Anomaly bundles: an image whose score reaches VALUE (> 0, in the units `predict` prints) is
      a defect.
    """
    from .adapt import set_threshold
    from .signing import signing_key_from

    b = set_threshold(bundle, value, wait=wait, signer=signing_key_from(sign_key))
    v = b.head_version
    if b.task == "anomaly":
        return emit({"bundle": str(b.path), "head_version": v, "anomaly_threshold": value}, as_json,
                    f"images scoring {value:.4g} or more are now 'defect' for head v{v} (the current version) in {b.path}")
    emit({"bundle": str(b.path), "head_version": v, "unknown_threshold": value}, as_json,
         f"predictions under {value:.2f} confidence are now 'unknown' for head v{v} (the current version) in {b.path}")


@main.command()
@click.argument("name")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Folder for NAME.key (private, mode 0600) and NAME.pub.")
@json_option
@handle_errors
def keygen(name, out, as_json):
    """Make an Ed25519 key pair for signing bundles (NAME.key) and trusting them (NAME.pub).

    Sign with `edgetl fit/export/adapt/rollback/threshold --sign NAME.key` (or EDGETL_SIGN_KEY);
    on a device, list the .pub in a trust policy and run with `edgetl --trust POLICY.toml` (or
    EDGETL_TRUST). Keep .key files only where bundles are made or adapted.
    """
    from .signing import generate_key, load_signing_key

    priv, pub = generate_key(name, out)
    kid = load_signing_key(priv).key_id
    emit({"private_key": str(priv), "public_key": str(pub), "key_id": kid}, as_json,
         f"wrote {priv} (private: keep it secret) and {pub} (public: key id {kid})\n"
         f"trust it on a device with a policy file:\n  [[key]]\n  name = \"{name}\"\n"
         f"  public_key = \"{pub.read_text().strip()}\"\n  may = [\"release\", \"adapt\", \"rollback\", \"threshold\"]")


# -------------------------------------------------------------------------------------- bench
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=50, show_default=True, help="Timed batch-1 runs.")
@click.option("--device", help="OpenVINO device override (CPU, NPU, GPU, AUTO).")
@json_option
@handle_errors
def bench(bundle, runs, device, as_json):
    """Latency p50/p90 at batch 1, throughput at the best batch, peak memory and size of BUNDLE."""
    from .benchmark import bench_bundle

    r = bench_bundle(bundle, runs=runs, device=device)
    where = f" (CPU fallback: {r['target_device']} is not on this machine)" if r["fallback"] else ""
    text = "\n".join([
        f"bundle      {bundle} ({r['precision']} on {r['runtime']}/{r['device']}{where})",
        f"numerics    float ops in {r['float_precision']} (asked {r['requested_float_precision']}); "
        f"this CPU's INT8 accumulates in {r['cpu']['int8']}",
        f"latency     p50 {r['latency_ms']['p50']:.2f} ms, p90 {r['latency_ms']['p90']:.2f} ms (batch 1, {runs} runs)",
        f"throughput  {r['throughput']['images_per_s']:.1f} images/s at batch {r['throughput']['batch']}",
        f"memory      {r['peak_rss_mb']:.0f} MB peak RSS",
        f"size        {r['backbone_mb']:.2f} MB backbone, {r['bundle_mb']:.2f} MB bundle",
        f"budget      {r['latency_budget_ms']} ms ({'met' if r['within_budget'] else 'NOT met'} on this machine"
        f"{', which is not the target device' if r['fallback'] else ''})",
    ])
    emit(r, as_json, text)


# --------------------------------------------------------------------------------------- info
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
@handle_errors
def info(bundle, as_json):
    """Show a bundle's manifest summary after verifying every file's hash."""
    from .bundle import load_bundle

    from .signing import signature_summary

    b = load_bundle(bundle)
    m = b.manifest
    sigs = signature_summary(m)
    if b.signers:
        signed = (f"checked against the trust policy: released by {b.signers['release']}, current state signed by "
                  f"{b.signers['state']}")
    elif sigs["signed"]:
        signed = f"released by {sigs['release']}, state by {sigs['state']} (not checked: no --trust policy)"
    else:
        signed = "no (integrity only: every file's sha256 is in the manifest)"
    text = "\n".join([
        f"bundle     {safe(b.path)} (format {m['format_version']}, edgetl {m.get('edgetl_version')})",
        f"task       {b.task}",
        f"backbone   {m['backbone']['name']} ({m['backbone'].get('num_features', '?')}-d, {m['precision']} on {m['runtime']})",
        f"target     {m['target']['name']}",
        f"labels     {', '.join(safe(l) for l in b.labels)}",
        f"head       v{b.head_version} of {len(m['head']['versions'])}",
        f"files      {len(m['files'])} verified",
        f"signed     {signed}",
    ])
    emit({"path": str(b.path), "verified": True, "signature": {**sigs, "checked": bool(b.signers),
                                                               "signers": b.signers}, **m}, as_json, text)


if __name__ == "__main__":  # pragma: no cover
    main()
