"""The ``edgetl`` command line: parse, call the library, print (human text or one JSON object).

Thin on purpose: a command parses its options, makes one library call and prints what the task
of the data or bundle renders (:mod:`edgetl.tasks`), so no command knows about images, texts or
defects. Heavy imports (torch, NNCF, OpenVINO) happen inside the library, so ``edgetl --help`` is
instant. A user mistake (:class:`edgetl.errors.EdgetlError`) prints ``error: ...`` on one line and
exits non-zero; with ``--json`` stdout carries exactly one JSON object, and messages go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .core.commands import handle_errors
from .core.console import safe
from .core.targets import PRECISIONS, RUNTIMES
from .errors import ConfigError

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


def emit(obj: dict, as_json: bool, text: str) -> None:
    """Print either the JSON object (machines) or the text (people) on stdout."""
    click.echo(json.dumps(obj, indent=2, default=str) if as_json else text)


def warn_skipped(skipped: list, *, quiet: bool) -> None:
    """One warning that counts and names the inputs that were skipped."""
    if skipped and not quiet:
        names = ", ".join(f"{safe(p)} ({safe(r)})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        click.echo(
            f"warning: skipped {len(skipped)} unreadable input(s): {names}{more} (--strict makes this fatal)", err=True
        )


def _skipped_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r.get("path", r.get("row")), r["reason"]) for r in rows]


def _bundle_task(bundle: Path):
    """The task of the bundle at ``bundle`` from its manifest (the files are verified on load)."""
    from . import tasks
    from .core.bundle import read_manifest

    return tasks.for_bundle(read_manifest(Path(bundle)), where=Path(bundle) / "manifest.json")


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there."
)
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars, status lines or warnings.")
wait_option = click.option(
    "--wait",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds to wait for another process writing the bundle (default: refuse at once, exit 4).",
)
device_option = click.option("--device", help="OpenVINO device override (CPU, NPU, GPU, AUTO).")
strict_option = click.option("--strict", is_flag=True, help="Make unreadable inputs fatal instead of skipped.")


def sign_option(what: str):
    return click.option(
        "--sign",
        "sign_key",
        type=click.Path(path_type=Path),
        envvar="EDGETL_SIGN_KEY",
        help=f"Sign {what} with this private key (from `edgetl keygen`).  [env: EDGETL_SIGN_KEY]",
    )


def _operations() -> list[str]:
    from .core.signing import OPERATIONS

    return list(OPERATIONS)


def _signer(sign_key):
    from .core.signing import signing_key_from

    return signing_key_from(sign_key)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetl")
@click.option(
    "--trust",
    type=click.Path(path_type=Path),
    envvar="EDGETL_TRUST",
    help="Trust policy (TOML of public keys and what each may do): refuse bundles and head versions "
    "not signed accordingly.  [env: EDGETL_TRUST]",
)
def main(trust) -> None:
    """Adapt a frozen pretrained backbone to your images or texts and ship it to an edge device.

    \b
    Typical use:
      edgetl example surfaces data/          # a small built-in dataset to try things on
      edgetl fit data/ --out parts.bundle    # train a head, quantize, export, verify
      edgetl predict parts.bundle img.jpg    # on the device: no torch needed
      edgetl adapt parts.bundle new/         # on the device: learn from new labelled images

    \b
    Tasks (from the data, or --task): classify (DATA/<class>/*.jpg), text (a CSV / TSV / JSONL
    of texts and labels), anomaly (good images only: DATA/train/good, MVTec layout).

    \b
    Exit codes: 0 ok, 2 a usage or input problem (one line says which), 3 a gate refused,
    4 another process is writing the bundle (--wait), 5 a signature check refused it.
    """
    from .core.signing import use_trust

    # The process's policy for every bundle load and write below; its environment is not touched.
    use_trust(trust)


# One option for every command that reads frames as a bundle will (fit, rank), one parser behind
# it (Roi.load).
roi_option = click.option(
    "--roi",
    help="Images: the region of interest every frame is cut to, x,y,w,h in pixels (100,50,800,600) "
    "or as fractions of the frame (0.1,0.05,0.8,0.9), or a camera file (.toml / .json with a [roi] table "
    "of x, y, w, h, unit); kept in the bundle, applied everywhere (rank: the candidates see it).",
)


# ----------------------------------------------------------------------------------------- fit
# Choice lists come from the registries that hold the names, so a new task, precision, runtime,
# example or score shows up in --help and is accepted without an edit here.
def _task_names() -> list[str]:
    from .tasks import TASKS

    return sorted(TASKS)


def _example_names() -> list[str]:
    from .datasets import EXAMPLES

    return list(EXAMPLES)


def _rank_scores() -> list[str]:
    from .transfer.rank import SCORES

    return list(SCORES)


def _head_kinds() -> list[str]:
    from .heads.classification import HEAD_KINDS
    from .heads.defect import DEFECT_KINDS
    from .heads.patch import PATCH_KINDS

    return [*HEAD_KINDS, *DEFECT_KINDS, *PATCH_KINDS]


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option(
    "--task",
    type=click.Choice(_task_names()),
    help="classify (images), text, or anomaly (good images only: defect detection).  [default: text for "
    "a CSV/TSV/JSONL file with a text column, anomaly for a DATA/train/good folder, else classify]",
)
@click.option(
    "--backbone",
    help="Image tasks: efficientnet_lite0/1/2, any timm model name, or 'auto' (chosen by "
    "`edgetl rank` on your training images); text: a sentence encoder (registry name, model folder or hub "
    "name).  [default: efficientnet_lite0; text: all-MiniLM-L6-v2]",
)
@click.option("--weights", type=click.Path(path_type=Path), help="Backbone weights (.safetensors or .pth state dict).")
@click.option(
    "--head",
    "head_kind",
    type=click.Choice(_head_kinds()),
    help="Head trained on the frozen features: linear (default), mlp, prototype; anomaly: combined "
    "(default: patchcore for local defects + knn on whole images for the wrong part, each scored "
    "against held-out good images), patchcore or padim alone (heat map, local defects), knn or "
    "gaussian alone (whole images, no heat map).",
)
@click.option(
    "--defect-size",
    type=float,
    help="anomaly: the smallest defect to find, in frame pixels (a scratch's "
    "width); frames too large to keep it visible in one view are scored as tiles.  [default: 3]",
)
@click.option(
    "--overview",
    type=click.Choice(["auto", "on", "off"]),
    help="anomaly, tiled frames: also score the whole frame in one view beside the tiles (large, "
    "low-contrast defects); auto: only where labelled anomalies show it helps.  [default: auto]",
)
@click.option("--l2", type=float, help="Classifier heads: L2 regularisation (default: chosen on the validation split).")
@click.option("--hidden", type=int, help="mlp head: hidden units.  [default: 256]")
@click.option("--epochs", type=int, help="linear / mlp heads: optimizer iterations.  [default: 300]")
@click.option(
    "--target",
    "-t",
    help="Target profile name (see `edgetl targets`) or a .toml file.  [default: openvino-cpu; text: cpu-x86]",
)
@click.option("--precision", type=click.Choice(PRECISIONS), help="Override the target's precision.")
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Override the target's runtime.")
@click.option("--val", type=click.Path(path_type=Path), help="Separate validation folder or file.")
@click.option(
    "--val-split",
    type=float,
    default=None,
    help="Also hold out this fraction per class (default: none; every item is scored out of fold).",
)
@click.option(
    "--group-by",
    help="Keep groups on one side of the split: a CSV column, 'folder' (DATA/<class>/<group>/), "
    "'regex:PATTERN' (on file names) or 'none'.  [default: a group column or <class>/<group>/ folders if present]",
)
@click.option(
    "--augment", type=int, default=0, show_default=True, help="Images: augmented views cached per training image."
)
@roi_option
@click.option("--calibration-size", type=int, help="INT8 calibration items (default: the target's, 128).")
@click.option(
    "--allow-drop", is_flag=True, help="Write the bundle even if quantization loses more than the target allows."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the head and calibration.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(path_type=Path),
    help="Cache directory  [default: $EDGETL_CACHE or ~/.cache/edgetl]",
)
@strict_option
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out (atomically; only a bundle).")
@sign_option("the bundle's release")
@click.option("--text-column", help="Text datasets: the text column (default: text, sentence, content, ...).")
@click.option("--label-column", help="Text datasets: the label column (default: label, class, category, ...).")
@click.option(
    "--report",
    "with_report",
    is_flag=True,
    help="Also write the HTML report beside the bundle (parts.bundle -> parts-report.html), evaluated on "
    "the validation split (defects: the test set); needs edgetl[report]. Elsewhere: `edgetl report`.",
)
@json_option
@quiet_option
@handle_errors
def fit(
    data,
    out,
    task,
    backbone,
    weights,
    head_kind,
    defect_size,
    overview,
    l2,
    hidden,
    epochs,
    target,
    precision,
    runtime,
    val,
    val_split,
    group_by,
    augment,
    roi,
    calibration_size,
    allow_drop,
    seed,
    cache_dir,
    strict,
    force,
    sign_key,
    text_column,
    label_column,
    with_report,
    as_json,
    quiet,
):
    """Train a head on DATA and write a deployable bundle to --out.

    DATA is an image folder (DATA/<class>/*.jpg), a DATA/train + DATA/val pair, a CSV with
    path,label columns, a CSV / TSV / JSONL of texts, or good images for defect detection. The
    backbone is exported once, converted for the target (INT8 calibrated on your training data by
    default), and the head is trained on the features that converted model produces, so it sees
    exactly what the device will compute. A statistical gate compares it with the FP32 model.
    """
    _setup_logging(quiet)
    from . import tasks
    from .pipeline.fit import FitOptions
    from .pipeline.fit import fit as run_fit

    if with_report:  # before minutes of training, not after
        from .report import check_dependencies, check_out, default_out

        check_dependencies()
        check_out(default_out(out), out, folder_must_exist=False)
    head = {
        k: v
        for k, v in {
            "kind": head_kind,
            "l2": l2,
            "hidden": hidden,
            "epochs": epochs,
            "defect_size": defect_size,
            "overview": overview,
        }.items()
        if v is not None
    }
    chosen = tasks.for_data(data, task=task, head=head_kind)
    head = chosen.head_config({**head, "seed": seed})
    opts = FitOptions(
        task=chosen.name,
        backbone=backbone,
        weights=str(weights) if weights else None,
        head=head,
        target=target,
        precision=precision,
        runtime=runtime,
        val=str(val) if val else None,
        val_split=val_split,
        group_by=group_by,
        augment=augment,
        seed=seed,
        roi=roi,
        cache_dir=str(cache_dir) if cache_dir else None,
        strict=strict,
        calibration_size=calibration_size,
        allow_drop=allow_drop,
        quiet=quiet or as_json,
        text_column=text_column,
        label_column=label_column,
        head_auto=head_kind is None,
    )
    result = run_fit(data, out, options=opts, force=force, signer=_signer(sign_key))
    warn_skipped(result.data.skipped, quiet=quiet)
    summary, text = chosen.fit_summary(result), chosen.render_fit(result)
    if with_report:
        from .report import report_for_fit

        page = report_for_fit(result, default_out(out)).path
        summary["report"], text = str(page), f"{text}\nreport    {safe(page)}"
    emit(summary, as_json, text)


# ---------------------------------------------------------------------------------------- eval
@main.command("eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--group-by",
    help="classify: accuracy per group too: a CSV column (camera, shift, supplier), 'folder' "
    "(DATA/<class>/<group>/) or 'regex:PATTERN' on file names; the worst group and its gap are flagged "
    "only beyond noise.",
)
@device_option
@strict_option
@json_option
@quiet_option
@handle_errors
def eval_cmd(bundle, data, group_by, device, strict, as_json, quiet):
    """BUNDLE's figures on labelled DATA (runs without torch).

    \b
    classify / text: accuracy with its 95% interval, per-class recall, confusion matrix;
    anomaly: image and pixel AUROC, precision / recall / F1 at the bundle's threshold.
    """
    _setup_logging(quiet)
    from .device.predict import load_predictor

    p = load_predictor(bundle, device=device)
    m = p.evaluate(data, quiet=quiet or as_json, strict=strict, **({"group_by": group_by} if group_by else {}))
    warn_skipped(_skipped_pairs(m["skipped"]), quiet=quiet)
    emit(m, as_json, p.task.render_metrics(m, title=f"{safe(bundle)} on {safe(data)} (head v{m['head_version']})"))


# ------------------------------------------------------------------------------------- predict
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1)
@click.option("--top-k", type=int, help="Classes listed per input.  [default: 1]")
@click.option(
    "--threshold",
    type=float,
    help="classify / text: answer 'unknown' below this confidence; anomaly: the "
    "defect score threshold.  [default: the bundle's]",
)
@click.option(
    "--file", "text_file", type=click.Path(path_type=Path), help="Text bundles: classify each line of this file."
)
@click.option(
    "--heatmaps", type=click.Path(path_type=Path), help="Anomaly bundles: write heat-map overlays (PNG) here."
)
@device_option
@strict_option
@json_option
@quiet_option
@handle_errors
def predict(bundle, inputs, top_k, threshold, text_file, heatmaps, device, strict, as_json, quiet):
    """Answer for INPUTS with BUNDLE (runs without torch).

    INPUTS are image files or folders; for a text bundle they are the texts themselves (or give
    --file FILE with one text per line, or pipe lines on stdin).
    """
    _setup_logging(quiet)
    from .device.predict import load_predictor

    task = _bundle_task(bundle)
    given = {"top_k": top_k, "threshold": threshold, "file": text_file, "heatmaps": heatmaps, "strict": strict or None}
    wrong = [k for k, v in given.items() if v is not None and k not in task.predict_options]
    if wrong:
        raise ConfigError(
            f"--{wrong[0].replace('_', '-')} does not apply to {task.name} bundles "
            f"(they take {', '.join('--' + o.replace('_', '-') for o in sorted(task.predict_options))})"
        )
    items = task.gather_inputs(list(inputs), file=text_file)
    p = load_predictor(bundle, device=device)
    skipped = None if strict else []
    options = {k: v for k, v in {"top_k": top_k, "heatmaps": heatmaps}.items() if v is not None}
    preds = p.predict(items, threshold=threshold, quiet=quiet or as_json, skipped=skipped, **options)
    warn_skipped(skipped or [], quiet=quiet)
    emit(
        {
            "predictions": [r.to_dict() for r in preds],
            "head_version": p.version,
            "skipped": [{"path": str(i), "reason": r} for i, r in (skipped or [])],
        },
        as_json,
        task.render_predictions(preds),
    )


# --------------------------------------------------------------------------------------- rank
@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--backbones",
    help="Comma-separated backbones to compare (registry or timm names).  "
    "[default: every built-in one: efficientnet_lite0,1,2]",
)
@click.option(
    "--target",
    "-t",
    help="Time each backbone as this target ships it (e.g. INT8); its latency budget bounds the choice "
    "(unless --budget-ms).  [default: FP32 ONNX Runtime, no budget]",
)
@click.option("--budget-ms", type=float, help="Batch-1 latency budget in ms for the choice.")
@click.option(
    "--by",
    type=click.Choice(_rank_scores()),
    default="cv",
    show_default=True,
    help="The score that decides: cross-validated head accuracy, or LogME (no training).",
)
@click.option("--val-split", type=float, default=0.2, show_default=True, help="Held out as fit would (not scored).")
@click.option("--group-by", help="Keep groups in one fold (as fit's --group-by).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), help="Cache directory.")
@roi_option
@json_option
@quiet_option
@handle_errors
def rank(data, backbones, target, budget_ms, by, val_split, group_by, seed, cache_dir, roi, as_json, quiet):
    """Score candidate backbones on the labelled images in DATA before fitting any of them.

    Each backbone's features of the training split are extracted once (the cache makes the fit that
    follows free) and scored by cross-validated head accuracy (grouped folds where the data have
    groups) and LogME. The choice is the cheapest backbone within the budget that the best-scoring
    one is not shown to beat (paired 95% interval): `fit --backbone auto` uses it. With --roi the
    frames are cut to the region first, as the bundle fitted with it will cut them.
    """
    _setup_logging(quiet)
    from .pipeline.rank import format_rank
    from .pipeline.rank import rank as run_rank

    names = [b.strip() for b in backbones.split(",") if b.strip()] if backbones else None
    r = run_rank(
        data,
        backbones=names,
        target=target,
        budget_ms=budget_ms,
        by=by,
        seed=seed,
        val_split=val_split,
        group_by=group_by,
        cache_dir=cache_dir,
        roi=roi,
        quiet=quiet or as_json,
    )
    emit(r, as_json, format_rank(r))


# -------------------------------------------------------------------------------------- drift
@main.command("drift")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--alpha",
    type=float,
    default=0.05,
    show_default=True,
    help="Significance level of the folder test (the false-alarm rate on undrifted data).",
)
@click.option(
    "--fail-on",
    type=click.Choice(["drift", "mild"]),
    help="Exit 3 when the verdict is at least this (for scripts and cron jobs).",
)
@json_option
@quiet_option
@handle_errors
def drift_cmd(bundle, data, alpha, fail_on, as_json, quiet):
    """Are the recent inputs in DATA still like BUNDLE's training data? (runs without torch)

    DATA is a folder of images (labelled DATA/<class>/... adds a test per class) or, for a text
    bundle, a CSV / TSV / JSONL or a file of lines. The verdict: none (adapt not needed), mild
    (detectable but small: check with eval), drift (adapt advisable), severe (most inputs are unlike
    anything trained on: label some, adapt or refit).
    """
    _setup_logging(quiet)
    from .device.drift import drift

    r = drift(bundle, data, alpha=alpha, quiet=quiet or as_json)
    warn_skipped([(s["path"], s["reason"]) for s in r["skipped"]], quiet=quiet)
    lines = [
        f"drift     {r['verdict']} (p {r['p_value']:.3g} at alpha {alpha:g}; "
        f"{r['inputs']} {'labelled ' if r['labelled'] else ''}"
        f"inputs; {r['ood_fraction']:.1%} of them out of distribution)",
        f"          {safe(r['message'])}",
    ]
    lines += [
        f"  {safe(c['label']):<14} p {c['p_adjusted']:.3g} (adjusted), {c['n']} inputs, {c['ood_fraction']:.0%} ood"
        for c in r.get("per_class", [])
    ]
    emit(r, as_json, "\n".join(lines))
    levels = {"none": 0, "mild": 1, "drift": 2, "severe": 3}
    if fail_on and levels[r["verdict"]] >= levels[fail_on]:
        sys.exit(3)


# ------------------------------------------------------------------------------------- export
@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--target", "-t", help="Target profile name or .toml file (default: the run's).")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Precision of the new bundle.")
@click.option("--runtime", type=click.Choice(RUNTIMES), help="Runtime of the new bundle.")
@click.option("--data", type=click.Path(path_type=Path), help="Training data, if it moved since the run.")
@click.option("--allow-drop", is_flag=True, help="Write the bundle even if quantization loses more than allowed.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), help="Cache directory.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out (atomically; only a bundle).")
@sign_option("the new bundle's release")
@json_option
@quiet_option
@handle_errors
def export(run, out, target, precision, runtime, data, allow_drop, cache_dir, force, sign_key, as_json, quiet):
    """Re-make bundle RUN for another target, precision or runtime.

    Uses the run's recorded data, split, backbone and head settings (a classifier's chosen L2
    included). Cached features make this fast; only the new model's features are computed. The
    head is retrained on the new model's features, so it matches what that device computes.
    """
    _setup_logging(quiet)
    from .pipeline.retarget import export_bundle

    result = export_bundle(
        run,
        out,
        target=target,
        precision=precision,
        runtime=runtime,
        data=data,
        allow_drop=allow_drop,
        cache_dir=cache_dir,
        force=force,
        quiet=quiet or as_json,
        signer=_signer(sign_key),
    )
    warn_skipped(result.data.skipped, quiet=quiet)
    emit(result.task.fit_summary(result), as_json, result.task.render_fit(result))


# ------------------------------------------------------------------------------------ targets
@main.command()
@json_option
@handle_errors
def targets(as_json):
    """List the shipped target profiles (add your own with --target FILE.toml)."""
    from . import tasks
    from .core.targets import list_targets

    ts = list_targets()
    defaults: dict[str, list[str]] = {}
    for task in tasks.TASKS.values():
        defaults.setdefault(task.default_target, []).append(task.name)
    width = max(len(t.name) for t in ts)
    mark = lambda t: f"  [default for {', '.join(sorted(defaults[t.name]))}]" if t.name in defaults else ""  # noqa: E731
    emit(
        {"targets": [{**t.to_dict(), "default_for": sorted(defaults.get(t.name, []))} for t in ts]},
        as_json,
        "\n".join(f"{t.name:<{width}}  {t.description}{mark(t)}" for t in ts),
    )


# ------------------------------------------------------------------------------------ example
@main.command()
@click.argument("name", type=click.Choice(_example_names()))
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
    from .datasets import make_example

    summary = make_example(name, out, seed=seed, force=force)
    emit({"example": name, "out": str(out), **summary}, as_json, f"wrote the {name!r} example to {safe(out)}")


# -------------------------------------------------------------------------------------- adapt
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--replace",
    is_flag=True,
    help="classify / text: train on DATA only (forget the replay memory and classes not in DATA).",
)
@click.option(
    "--tolerance",
    type=float,
    default=5.0,
    show_default=True,
    help="classify / text: allowed accuracy drop on known classes, in percentage points.",
)
@click.option("--threshold", type=float, help="anomaly: a new defect score threshold (default: carried over).")
@click.option("--force", is_flag=True, help="Accept the update even if the gate refuses it.")
@click.option("--dry-run", is_flag=True, help="Train and run the gate, but write nothing.")
@click.option("--seed", type=int, default=0, show_default=True)
@strict_option
@wait_option
@sign_option("the change")
@json_option
@quiet_option
@handle_errors
def adapt(bundle, data, replace, tolerance, threshold, force, dry_run, seed, strict, wait, sign_key, as_json, quiet):
    """Update BUNDLE on the device from new data in DATA (no torch): a new head version, or nothing.

    \b
    classify / text: DATA holds new labelled images (DATA/<class>/...) or texts; new class names
      add classes. The head is retrained on DATA plus the bundle's replay exemplars and checked
      by a gate on held-out items; it becomes current only if it passes (exit 3 otherwise).
    anomaly: DATA holds newly confirmed good images (DATA/*.png, DATA/good/ or DATA/train/good/);
      they join the memory bank or the statistics and the threshold carries over.
    """
    _setup_logging(quiet)
    from .device.adapt import adapt as run_adapt

    task = _bundle_task(bundle)
    r = run_adapt(
        bundle,
        data,
        replace=replace,
        force=force,
        tolerance_pp=tolerance,
        seed=seed,
        strict=strict,
        dry_run=dry_run,
        quiet=quiet or as_json,
        wait=wait,
        signer=_signer(sign_key),
        threshold=threshold,
    )
    warn_skipped(r.skipped, quiet=quiet)
    for w in (r.summary.get("gate") or {}).get("warnings", []) if not quiet else []:
        click.echo(f"warning: {safe(w)}", err=True)
    emit(r.to_dict(), as_json, task.render_adapt(r, dry_run))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--to", "to", type=int, help="Version to make current (default: the previous one).")
@wait_option
@sign_option("the change")
@json_option
@handle_errors
def rollback(bundle, to, wait, sign_key, as_json):
    """Make an earlier head version of BUNDLE current again (with that version's own thresholds)."""
    from .device.adapt import rollback as run_rollback

    b = run_rollback(bundle, to=to, wait=wait, signer=_signer(sign_key))
    thresholds = b.manifest.get("thresholds", {})
    shown = ", ".join(f"{k} threshold {v:g}" for k, v in thresholds.items())
    emit(
        {"bundle": str(b.path), "current": b.head_version, "labels": b.labels, "thresholds": thresholds},
        as_json,
        f"head v{b.head_version} is now current in {safe(b.path)}" + (f" ({shown}, its own)" if shown else ""),
    )


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
@handle_errors
def history(bundle, as_json):
    """List BUNDLE's head versions (the current one marked with *)."""
    from .device.adapt import history as run_history

    rows = run_history(bundle)
    emit({"versions": rows}, as_json, _bundle_task(bundle).render_history(rows))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("value", type=float)
@wait_option
@sign_option("the change")
@json_option
@handle_errors
def threshold(bundle, value, wait, sign_key, as_json):
    """Set the decision threshold of BUNDLE's current head version (kept in the manifest, never
    baked into a graph; every version keeps its own, and a rollback brings back that version's).

    \b
    classify / text: below VALUE confidence (0..1), predict answers "unknown"; 0 disables it.
    anomaly: an image whose score reaches VALUE (> 0, in the units `predict` prints) is a defect.
    """
    from .device.adapt import set_threshold

    b = set_threshold(bundle, value, wait=wait, signer=_signer(sign_key))
    task = _bundle_task(b.path)
    emit(
        {"bundle": str(b.path), "head_version": b.head_version, f"{task.threshold_key}_threshold": value},
        as_json,
        task.render_threshold(value, b.head_version, safe(b.path)),
    )


@main.command()
@click.argument("name")
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder for NAME.key (private, mode 0600) and NAME.pub.",
)
@click.option(
    "--device",
    "device_key",
    is_flag=True,
    help="A device's own key: its policy entry may adapt, roll back and set thresholds, never release.",
)
@click.option(
    "--may",
    "may",
    multiple=True,
    type=click.Choice(_operations()),
    help="An operation the printed policy entry allows (repeat it).  [default: release, adapt, rollback, "
    "threshold; with --device: adapt, rollback, threshold]",
)
@json_option
@handle_errors
def keygen(name, out, device_key, may, as_json):
    """Make an Ed25519 key pair for signing bundles (NAME.key) and trusting them (NAME.pub).

    Sign with `edgetl fit/export/adapt/rollback/threshold --sign NAME.key` (or EDGETL_SIGN_KEY);
    on a device, list the .pub in a trust policy and run with `edgetl --trust POLICY.toml` (or
    EDGETL_TRUST). Keep .key files only where bundles are made or adapted.
    """
    from .core.signing import DEVICE_OPERATIONS, FACTORY_OPERATIONS, generate_key, load_signing_key, policy_entry

    if device_key and may:
        raise ConfigError("--device and --may both say what the key may do; give one of them")
    ops = tuple(dict.fromkeys(may)) or (DEVICE_OPERATIONS if device_key else FACTORY_OPERATIONS)
    priv, pub = generate_key(name, out)
    kid = load_signing_key(priv).key_id
    entry = policy_entry(pub.read_text(), ops)
    emit(
        {"private_key": str(priv), "public_key": str(pub), "key_id": kid, "may": list(ops), "policy": entry},
        as_json,
        f"wrote {safe(priv)} (private: keep it secret) and {safe(pub)} (public: key id {kid})\n"
        "trust it on a device with a policy file (edgetl --trust POLICY.toml):\n" + entry,
    )


# -------------------------------------------------------------------------------------- bench
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=50, show_default=True, help="Timed batch-1 runs.")
@device_option
@json_option
@handle_errors
def bench(bundle, runs, device, as_json):
    """Latency p50/p90 at batch 1, throughput at the best batch, peak memory and size of BUNDLE."""
    from .device.bench import bench_bundle

    r = bench_bundle(bundle, runs=runs, device=device)
    where = f" (CPU fallback: {r['target_device']} is not on this machine)" if r["fallback"] else ""
    emit(
        r,
        as_json,
        "\n".join(
            [
                f"bundle      {safe(bundle)} ({r['precision']} on {r['runtime']}/{r['device']}{where})",
                f"numerics    float ops in {r['float_precision']} (asked {r['requested_float_precision']}); "
                f"this CPU's INT8 accumulates in {r['cpu']['int8']}",
                f"latency     p50 {r['latency_ms']['p50']:.2f} ms, "
                f"p90 {r['latency_ms']['p90']:.2f} ms (batch 1, {runs} runs)",
                f"throughput  {r['throughput'][r['items'] + '_per_s']:.1f} {r['items']}/s "
                f"at batch {r['throughput']['batch']}",
                f"memory      {r['peak_rss_mb']:.0f} MB peak RSS",
                f"size        {r['backbone_mb']:.2f} MB backbone, {r['bundle_mb']:.2f} MB bundle",
                f"budget      {r['latency_budget_ms']} ms ({'met' if r['within_budget'] else 'NOT met'} on this machine"
                f"{', which is not the target device' if r['fallback'] else ''})",
            ]
        ),
    )


# --------------------------------------------------------------------------------------- info
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
@handle_errors
def info(bundle, as_json):
    """Show a bundle's manifest summary after verifying every file's hash (and signatures, with --trust)."""
    from .core.bundle import load_bundle
    from .core.signing import signature_summary
    from .device.predict import deployment

    b = load_bundle(bundle)
    dep = deployment(b)
    m = b.manifest
    sigs = signature_summary(m)
    if b.signers:
        signed = (
            f"checked against the trust policy: released by {b.signers['release']}, current state signed by "
            f"{b.signers['state']}"
        )
    elif sigs["signed"]:
        signed = f"released by {sigs['release']}, state by {sigs['state']} (not checked: no --trust policy)"
    else:
        signed = "no (integrity only: every file's sha256 is in the manifest)"
    emit(
        {
            "path": str(b.path),
            "verified": True,
            "signature": {**sigs, "checked": bool(b.signers), "signers": b.signers},
            "deployment": dep,
            **m,
        },
        as_json,
        "\n".join(
            [
                f"bundle     {safe(b.path)} (format {m['format_version']}, edgetl {m.get('edgetl_version')})",
                f"task       {b.task}",
                f"backbone   {m['backbone']['name']} ({m['backbone'].get('num_features', '?')}-d, {m['precision']} on "
                f"{m['runtime']})",
                f"target     {m['target']['name']}",
                f"labels     {', '.join(safe(l) for l in b.labels)}",
                f"head       v{b.head_version} of {len(m['head']['versions'])}",
                f"files      {len(m['files'])} verified",
                f"signed     {signed}",
                f"device     {dep['install']} (no torch); "
                f"an app that only infers needs just {' + '.join(dep['app_files'])}",
            ]
        ),
    )


# ----------------------------------------------------------------- groups built on the device API
def _attach() -> None:
    # Each group lives beside its library package; imported here so `edgetl --help` lists them,
    # while their optional dependencies (Flower, matplotlib, Starlette) load only when they run.
    from .fleet.cli import fleet
    from .report.cli import report
    from .serve.cli import serve

    for command in (fleet, report, serve):
        main.add_command(command)


_attach()

if __name__ == "__main__":  # pragma: no cover
    main()
