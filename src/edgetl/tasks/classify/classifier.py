"""What every classification task shares, whatever its inputs (images or texts): the numpy heads,
the paired accuracy gate, the replay memory, the probability graph, the predictor and the update.

A modality (:class:`edgetl.tasks.classify.task.ImageClassifyTask`,
:class:`edgetl.tasks.text.task.TextTask`) adds how its items are found, read and turned into
features (:meth:`ClassifierTask.features`, :meth:`ClassifierTask.scan`,
:meth:`ClassifierTask.predict_items`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.gate import accuracy_gate
from ...core.metrics import classification_metrics, feature_cosine, format_metrics
from ...core.sessions import bundle_session
from ...errors import BundleError, ConfigError, DataError
from ...heads import registry
from ...heads.classification import HEAD_KINDS, Head, HeadConfig, softmax
from ...heads.crossfit import FoldPlan, cross_fit, expected_calibration_error, fold_plan
from ...heads.exemplars import EXEMPLARS_PER_CLASS, herding, save_exemplars
from ...transfer.drift import load_drift_reference, save_drift_reference
from ..base import AdaptResult, Task, Trained, coerce_head_config
from .update import drift_reference, update_head

# Up to this many items a class (median) the prototype head is preferred: it wins ties of
# out-of-fold accuracy, and stands alone at one item a class where nothing can be held out.
FEW_SHOT = 10

# Per-image drift: an input whose conformal p-value against the training images' drift scores is
# under this is "ood" (1 % of in-distribution inputs are flagged, by construction).
OOD_ALPHA = 0.01


def drift_info(ref) -> dict:
    return {
        "version": int(ref.arrays["version"]),
        "rank": ref.rank,
        "reference_items": ref.n_reference,
        "image_alpha": OOD_ALPHA,
    }


def _candidate_words(c: dict) -> str:
    how = ([f"{c['scaling']} scale"] if c.get("scaling") else []) + ([f"l2 {c['l2']:g}"] if c["l2"] is not None else [])
    l2 = f" ({', '.join(how)})" if how else ""
    score = "n/a" if c["oof_score"] is None else f"{c['oof_score']:.1%}"
    return f"{c['kind']}{l2} {score}" + (" <- chosen" if c["chosen"] else "")


def check_confidence(threshold: float | None) -> None:
    """A confidence threshold is a number in [0, 1] (or None for the bundle's own).

    Raises:
        ConfigError: anything else.
    """
    if threshold is not None and not (
        isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0
    ):
        raise ConfigError(f"--threshold {threshold!r}: a confidence between 0 and 1 (0 turns 'unknown' off)")


@dataclass
class Prediction:
    """One input's answer. ``label`` is ``"unknown"`` when confidence is under the threshold;
    ``item`` is the image's path or the text, reported under ``key``."""

    item: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    unknown: bool = False
    key: str = "path"
    # Drift of the input against the training items (None without a drift reference): the
    # conformal p-value, and ``ood`` when it is under the bundle's alpha. Distinct from
    # ``unknown``, which is about the answer's confidence.
    drift_p: float | None = None
    ood: bool | None = None

    @property
    def path(self) -> str:
        return self.item

    def to_dict(self) -> dict:
        d = {
            self.key: self.item,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "unknown": self.unknown,
            "top_k": [{"label": l, "p": round(p, 6)} for l, p in self.top_k],
        }
        if self.drift_p is not None:
            d.update(drift_p=round(self.drift_p, 6), ood=self.ood)
        return d


class ClassifierPredictor:
    """A classification bundle ready to answer (device side: numpy + the runtime).

    Example:
        >>> p = load_predictor("parts.bundle")  # doctest: +SKIP
        >>> [r.label for r in p.predict(["a.jpg", "b.jpg"])]  # doctest: +SKIP
    """

    def __init__(self, task: ClassifierTask, bundle, extractor, head: Head, version: int, threshold: float, drift=None):
        self.task, self.bundle, self.extractor, self.head = task, bundle, extractor, head
        self.version, self.threshold, self.drift = version, threshold, drift
        self.session = extractor.session

    @property
    def labels(self) -> list[str]:
        return self.head.labels

    def proba(self, items: Sequence, *, quiet: bool = True, skipped: list | None = None) -> np.ndarray:
        X = self.task.features(self.extractor, items, quiet=quiet, desc="predict", skipped=skipped)
        return self.head.proba(X) if len(X) else np.zeros((0, len(self.labels)), np.float32)

    def predict(
        self,
        inputs: Sequence,
        *,
        top_k: int = 1,
        threshold: float | None = None,
        quiet: bool = True,
        skipped: list | None = None,
    ) -> list[Prediction]:
        """Classify images (files or folders) or texts, in order.

        Unreadable inputs raise :class:`DataError`, or, with a ``skipped`` list, are recorded there
        as ``(input, reason)`` and left out.

        Raises:
            DataError: no input, or an unreadable one (without ``skipped``).
            ConfigError: a threshold outside 0..1.
        """
        check_confidence(threshold)
        items = self.task.predict_items(inputs)
        bad: list = []
        X = self.task.features(
            self.extractor, items, quiet=quiet, desc="predict", skipped=bad if skipped is not None else None
        )
        if skipped is not None and bad:
            skipped.extend(bad)
            gone = {str(p) for p, _ in bad}
            items = [i for i in items if str(i) not in gone]
        probs = self.head.proba(X) if len(X) else np.zeros((0, len(self.labels)), np.float32)
        drift = self.drift.score(X, image_alpha=OOD_ALPHA) if self.drift is not None and len(X) else None
        thr = self.threshold if threshold is None else threshold
        k = max(1, min(top_k, len(self.labels)))
        out = []
        for i, (item, p) in enumerate(zip(items, probs)):
            order = np.argsort(-p, kind="stable")[:k]
            best = int(order[0])
            unknown = bool(p[best] < thr)
            out.append(
                Prediction(
                    str(item),
                    "unknown" if unknown else self.labels[best],
                    float(p[best]),
                    [(self.labels[int(j)], float(p[int(j)])) for j in order],
                    unknown,
                    self.task.item_key,
                    *(() if drift is None else (float(drift.p_value[i]), bool(drift.ood[i]))),
                )
            )
        return out

    def evaluate(
        self,
        data,
        *,
        quiet: bool = True,
        strict: bool = False,
        group_by: str | None = None,
        threshold: float | None = None,
        details: bool = False,
    ) -> dict:
        """Accuracy (with its interval), per-class recall and the confusion matrix on every
        labelled item of ``data``; with ``group_by`` (a CSV column, ``folder`` or ``regex:PATTERN``)
        also accuracy per group, the worst group and its gap (``groups``).

        Also what the "unknown" threshold does, so one can be chosen: ``unknown`` at the bundle's
        threshold (or ``threshold``): the share of items it rejects, the coverage, and the accuracy
        on the items it still answers; ``coverage``, the same at the thresholds that would reject
        the least confident 0, 5, 10, 20, 30 and 50 % of these items; and
        ``misclassified``: every wrong item with its true and predicted class, confidence and
        top 2, most confident first. With ``details``, ``items`` lists every item that way.
        ``data`` may also be labelled items already found (``path`` / ``text`` and ``label``).

        Raises:
            DataError: no usable items, or a class the bundle does not know.
            ConfigError: a threshold outside 0..1.
        """
        check_confidence(threshold)
        if isinstance(data, (list, tuple)):
            skipped: list = []
            items, where = list(data), f"the {len(data)} given {self.task.items}"
        else:
            items, skipped = self.task.scan(data, bundle=self.bundle, strict=strict, group_by=group_by)
            where = data
        if not items:
            raise DataError(f"{where}: no usable labelled {self.task.items} to evaluate ({len(skipped)} skipped)")
        unknown = sorted({s.label for s in items} - set(self.labels))
        if unknown:
            raise DataError(
                f"{where}: class {unknown[0]!r} is not in this bundle (knows: {', '.join(self.labels)}); "
                "teach it first with: edgetl adapt BUNDLE DATA"
            )
        index = {l: i for i, l in enumerate(self.labels)}
        X = self.task.features(self.extractor, items, quiet=quiet, desc="eval")
        y = np.array([index[s.label] for s in items], dtype=np.int64)
        pred = self.head.predict(X)
        m = classification_metrics(y, pred, self.labels)
        if group_by:
            from ...transfer.groups import group_accuracy

            m["groups"] = group_accuracy(y, pred, [s.group or "(no group)" for s in items]).to_dict()
        # The answer's confidence decides "unknown" exactly as predict does (answered iff >= threshold).
        P = self.head.proba(X)
        conf = P[np.arange(len(y)), pred]
        right = pred == y

        def answered_at(t: float) -> dict:
            keep = conf >= t
            k = int(keep.sum())
            return {
                "threshold": round(float(t), 4),
                "coverage": round(k / len(y), 4),
                "reject_rate": round(1 - k / len(y), 4),
                "accuracy": round(float(right[keep].mean()), 4) if k else None,
                "rejected_wrong": int(np.sum(~keep & ~right)),
                "rejected_right": int(np.sum(~keep & right)),
            }

        m["unknown"] = answered_at(self.threshold if threshold is None else float(threshold))
        # Thresholds read off these items' confidences: the one that answers "unknown" for the
        # least confident 5 %, 10 % ... (rounded down, so it keeps the item it was read from).
        ranked = np.sort(conf)
        cuts = sorted(
            {
                math.floor(float(ranked[int(r * len(y))]) * 1e3) / 1e3 if r else 0.0
                for r in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
            }
        )
        m["coverage"] = [answered_at(t) for t in cuts]
        top2 = np.argsort(-P, axis=1, kind="stable")[:, :2]
        key = self.task.item_key

        def record(i: int) -> dict:
            s = items[i]
            r = {
                key: str(getattr(s, key, getattr(s, "path", s))),
                "label": s.label,
                "predicted": self.labels[int(pred[i])],
                "confidence": round(float(conf[i]), 6),
                "top_k": [{"label": self.labels[int(j)], "p": round(float(P[i, j]), 6)} for j in top2[i]],
            }
            if getattr(s, "where", None) and key != "path":
                r["where"] = s.where
            return r

        m["misclassified"] = [record(int(i)) for i in sorted(np.flatnonzero(~right), key=lambda i: -conf[i])]
        if details:
            m["items"] = [dict(record(i), correct=bool(right[i])) for i in range(len(y))]
        m["skipped"] = [{"path": str(p), "reason": r} for p, r in skipped]
        m["head_version"] = self.version
        return m


class ClassifierTask(Task):
    """Classification: a numpy head (linear / mlp / prototype) on frozen features."""

    head_kinds = HEAD_KINDS
    predict_options = frozenset({"top_k", "threshold", "strict"})
    threshold_key, threshold_field = "unknown", "unknown_threshold"
    item_key = "path"
    gate_metric = "accuracy"  # the paired accuracy gate (accuracy_gate)
    leakage_check = True
    exemplars_per_class = EXEMPLARS_PER_CLASS
    # the no-pretraining baseline of the negative-transfer check: its cache key, per modality
    baseline_key: str

    @property
    def baseline_name(self) -> str:
        """The no-pretraining baseline's name, as the negative-transfer check reports it."""
        raise NotImplementedError

    # ---- what a modality provides ----------------------------------------------------------
    def features(
        self,
        extractor,
        items: Sequence,
        *,
        cache=None,
        view: int = 0,
        quiet: bool = True,
        desc: str = "features",
        skipped: list | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        return extractor.features(
            items, cache=cache, view=view, quiet=quiet, desc=desc, skipped=skipped, batch_size=batch_size
        )

    def scan(self, data, *, bundle=None, strict: bool = False, group_by: str | None = None) -> tuple[list, list]:
        """Labelled items of ``data`` for eval / adapt: (items, skipped)."""
        raise NotImplementedError

    def predict_items(self, inputs: Sequence) -> list:
        raise NotImplementedError

    def views(self, options) -> int:
        """Augmented views per training item (images only)."""
        return 0

    # ---- fit -------------------------------------------------------------------------------
    def head_config(self, head) -> HeadConfig:
        return coerce_head_config(head, HeadConfig, "linear", HEAD_KINDS)

    def recorded_head(self, bundle, head: dict) -> HeadConfig:
        """The recorded settings with the kind and L2 the first fit chose, so a re-export need not
        search again (and trains the kind that shipped, not the default)."""
        cfg = self.head_config(head)
        entry = bundle.head_entry(1)
        chosen = entry.get("l2")
        d = {**cfg.to_dict(), "kind": entry.get("kind", cfg.kind), "scaling": entry.get("scaling", cfg.scaling)}
        if cfg.l2 is None and chosen is not None:
            d["l2"] = chosen
        return HeadConfig.from_dict(d)

    def head_candidates(self, cfg: HeadConfig, y: np.ndarray, k: int, options) -> list | None:
        """The heads ``fit`` chooses from by out-of-fold accuracy. When no kind was named: the
        linear head on the features' own geometry (one scale) and standardised, and the prototype
        (nearest class mean), which wins on a few items a class. The one listed first wins ties and
        stands alone when no item can be held out: the prototype up to :data:`FEW_SHOT` items a
        class, the linear head above. A named linear head still has its scaling chosen."""
        if not getattr(options, "head_auto", False):
            return registry.get(cfg.kind, "classify").named_candidates()
        linear = registry.get("linear", "classify").named_candidates() or []
        counts = np.bincount(y, minlength=k)
        few = float(np.median(counts[counts > 0])) <= FEW_SHOT
        return [{"kind": "prototype"}, *linear] if few else [*linear, {"kind": "prototype"}]

    def train(self, extractor, data, options, cache, *, like: Trained | None = None) -> Trained:
        """The shipped head on every training item, and out-of-fold figures for all of them (and
        holdout figures on an explicit validation set); ``like``: the FP32 reference, trained with
        the shipped head's kind, L2 and folds so the gate pairs the two item by item."""
        views = self.views(options)
        index = {label: i for i, label in enumerate(data.classes)}
        k = len(data.classes)

        def split(items, n_views, desc):
            blocks = [
                self.features(
                    extractor,
                    items,
                    cache=cache,
                    view=v,
                    quiet=options.quiet,
                    desc=f"{desc} (view {v})" if v else desc,
                    batch_size=options.batch_size,
                )
                for v in range(n_views + 1)
            ]
            y = np.array([index[s.label] for s in items], dtype=np.int64)
            return (np.concatenate(blocks) if items else np.zeros((0, 0), np.float32)), np.tile(y, n_views + 1)

        desc = "fp32 reference" if like is not None else f"{self.items[:-1]} features"
        X_tr, y_tr = split(data.train, views, desc)
        X_va, y_va = split(data.val, 0, f"{desc} val")
        n = len(data.train)
        cfg = dataclasses.replace(self.head_config(options.head), calibrate=True)
        if like is not None:  # the reference trains with the settings the shipped head chose, on its folds
            plan, kinds = like.features["plan"], None
            cfg = HeadConfig.from_dict(
                {
                    **like.head.meta.get("config", cfg.to_dict()),
                    "kind": like.head.kind,
                    "l2": like.head.meta.get("l2", cfg.l2),
                    "calibrate": True,
                }
            )
        else:
            groups = [getattr(s, "group", "") for s in data.train]
            plan = fold_plan(y_tr[:n], k, groups=groups if any(groups) else None, seed=options.seed)
            kinds = self.head_candidates(cfg, y_tr[:n], k, options)
        # augmented views of an item share its fold (never trained on while it is held out), never scored
        tiled = FoldPlan(np.tile(plan.fold, views + 1), plan.method, plan.folds)
        cf = cross_fit(X_tr, y_tr, data.classes, cfg=cfg, kinds=kinds, plan=tiled, scored=np.arange(len(y_tr)) < n)
        head = cf.head
        ok = cf.scored[:n]
        oof_pred = np.argmax(cf.logits[:n][ok], axis=1)
        oof = classification_metrics(y_tr[:n][ok], oof_pred, data.classes) if ok.any() else {}
        if oof:
            oof.update(
                estimate="out-of-fold",
                folds=plan.method,
                ece=round(expected_calibration_error(softmax(cf.logits[:n][ok]), y_tr[:n][ok]), 4),
            )
        evidence = [oof_pred == y_tr[:n][ok]]
        if len(X_va):
            pred_va = head.predict(X_va)
            metrics = {
                **classification_metrics(y_va, pred_va, data.classes),
                "estimate": "holdout",
                "ece": round(expected_calibration_error(head.proba(X_va), y_va), 4),
            }
            if oof:
                metrics["oof"] = oof
            evidence.append(pred_va == y_va)
        else:
            metrics = oof
        train_metrics = classification_metrics(y_tr[:n], head.predict(X_tr[:n]), data.classes)
        return Trained(
            head,
            metrics,
            np.concatenate(evidence),
            train_metrics,
            cache.misses if cache else 0,
            extractor.session,
            {
                "X_tr": X_tr,
                "y_tr": y_tr,
                "X_va": X_va,
                "n_train": n,
                "plan": plan,
                "oof_logits": cf.logits[:n],
                "crossfit": cf.summary(),
            },
        )

    def gate(self, trained: Trained, reference: Trained, tolerance_pp: float):
        """The shipped model's per-item correctness paired with the FP32 reference's, over every
        item: out of fold on the training items (same folds, same head settings), plus any holdout."""
        X_va, R_va = trained.features["X_va"], reference.features["X_va"]
        cos = (
            feature_cosine(R_va, X_va)
            if len(R_va)
            else feature_cosine(reference.features["X_tr"], trained.features["X_tr"])
        )
        ref_acc = float(np.mean(reference.outcome)) if len(reference.outcome) else None
        acc = float(np.mean(trained.outcome)) if len(trained.outcome) else None
        ref = {
            "fp32_val_accuracy": ref_acc,
            "val_accuracy": acc,
            "evidence": self.evidence_words(trained),
            "feature_cosine_mean": round(float(cos.mean()), 5),
            "feature_cosine_min": round(float(cos.min()), 5),
        }
        if ref_acc is not None and acc is not None:
            ref["accuracy_drop_pp"] = round((ref_acc - acc) * 100, 3)
            # What conversion costs each class, not only on average: a class can lose points while
            # the overall accuracy holds (the report draws the two side by side).
            ref["fp32_per_class_recall"] = (reference.metrics.get("oof") or reference.metrics).get("per_class_recall")
        return ref, accuracy_gate(reference.outcome, trained.outcome, tolerance_pp=tolerance_pp)

    def evidence_words(self, trained: Trained) -> str:
        """What the gate's items are: "200 images out of fold", "+ 40 holdout"."""
        n_oof = (
            int(np.count_nonzero(~np.isnan(trained.features["oof_logits"][:, 0])))
            if len(trained.features.get("oof_logits", []))
            else 0
        )
        n_val = len(trained.features["X_va"])
        parts = ([f"{n_oof} {self.items} out of fold"] if n_oof else []) + ([f"{n_val} holdout"] if n_val else [])
        return " + ".join(parts) or "none"

    def transfer_check(self, trained: Trained, data, exported, cache_root: Path) -> dict | None:
        """The shipped head against a linear head on :meth:`baseline_features` (no pretraining),
        paired on the same items: out of fold on the training items (the shipped head's folds),
        and on the holdout."""
        from ...core.features import FeatureCache
        from ...transfer.negative import baseline_outcome_check

        if not len(trained.outcome):
            return None
        # keyed by the preprocessing too: another region of interest is another baseline
        prep = hashlib.sha256(json.dumps(exported.preprocess, sort_keys=True, default=str).encode()).hexdigest()[:16]
        cache = FeatureCache(cache_root, f"{self.baseline_key}-{prep}")
        index = {label: i for i, label in enumerate(data.classes)}
        y_tr = np.array([index[s.label] for s in data.train], np.int64)
        B_tr = self.baseline_features(data.train, cache, exported)
        f = trained.features
        ok = ~np.isnan(f["oof_logits"][:, 0])
        cfg = HeadConfig(kind="linear", seed=0)
        cf = cross_fit(B_tr, y_tr, data.classes, cfg=cfg, plan=f["plan"], calibrate=False)
        evidence = [np.argmax(cf.logits[ok], axis=1) == y_tr[ok]]
        if data.val:
            y_va = np.array([index[s.label] for s in data.val], np.int64)
            evidence.append(cf.head.predict(self.baseline_features(data.val, cache, exported)) == y_va)
        baseline = np.concatenate(evidence)
        if len(baseline) != len(trained.outcome):
            return None
        check = baseline_outcome_check(
            trained.outcome,
            baseline,
            backbone=exported.name,
            baseline=self.baseline_name,
            items=self.items,
            scored="out-of-fold" + (" and holdout" if data.val else ""),
        )
        return check.to_dict()

    def baseline_features(self, items: Sequence, cache, exported) -> np.ndarray:
        """A no-pretraining description of each item as the backbone's preprocessing presents it
        (cached per item digest)."""
        raise NotImplementedError

    def accuracy_score(self, reference: Trained, data):
        """What accuracy control maximises: the FP32-trained head's accuracy on the holdout items
        (without one, on the training items: the head has seen them, so the figure is optimistic,
        but what it ranks is how much each layer kept in float restores of the FP32 answers),
        from a converted model's outputs. -> (score(outputs), labels)."""
        index = {label: i for i, label in enumerate(data.classes)}
        labels = np.array([index[s.label] for s in (data.val or data.train)])

        def score(features: np.ndarray) -> tuple[float, list[float]]:
            hits = (reference.head.predict(features) == labels[: len(features)]).astype(float)
            return float(hits.mean()), hits.tolist()

        return score

    def write_release(self, folder: Path, trained: Trained, data, options, exported) -> dict:
        head, f = trained.head, trained.features
        per_class = options.exemplars_per_class or self.exemplars_per_class
        plain, y = f["X_tr"][: f["n_train"]], f["y_tr"][: f["n_train"]]
        ex = herding(plain, y, len(data.classes), per_class=per_class)
        save_exemplars(folder / "exemplars.npz", plain[ex], y[ex], data.classes)
        # the reference is every training item scored out of fold (on the head's folds): a holdout
        # of a few dozen could never give a p-value under 1 %
        drift = drift_reference(plain, y, len(data.classes), folds=f["plan"].fold)
        if drift is not None:
            save_drift_reference(drift, folder / "drift.npz")
        m = trained.metrics
        return {
            "entry": {
                "exemplars": "exemplars.npz",
                **({"drift": "drift.npz"} if drift else {}),
                "kind": head.kind,
                "labels": data.classes,
                "val_accuracy": m.get("accuracy"),
                "unknown_threshold": 0.0,
                "l2": head.meta.get("l2"),
                "scaling": head.meta.get("config", {}).get("scaling", "feature"),
            },
            "manifest": {
                "labels": data.classes,
                "thresholds": {"unknown": 0.0},
                "exemplars": {"file": "exemplars.npz", "per_class": per_class, "selection": "herding"},
                **({"drift": drift_info(drift)} if drift else {}),
                "metrics": {
                    "val": {
                        k: m.get(k)
                        for k in (
                            "accuracy",
                            "accuracy_interval",
                            "balanced_accuracy",
                            "per_class_recall",
                            "estimate",
                            "n",
                            "ece",
                        )
                    },
                    "calibration": head.meta.get("calibration"),
                    "head_choice": head.meta.get("oof", {}).get("candidates"),
                    "train_accuracy": trained.train_metrics["accuracy"],
                },
            },
            "report": {"val": m, "train_accuracy": trained.train_metrics["accuracy"], "crossfit": f.get("crossfit")},
        }

    def parity(self, fused_session, trained: Trained, data, exported) -> tuple[dict, float, str]:
        from ...core.fuse import parity

        probe = (data.val or data.train)[:16]
        # both sides computed in one batch the same way, so only the fusion can differ
        features = self.fused_outputs(trained.session, probe, exported)
        par = parity(self.fused_outputs(fused_session, probe, exported), trained.head.proba(features))
        return par, par["max_abs_diff"], "max probability difference"

    def fused_outputs(self, fused_session, items, exported) -> np.ndarray:
        raise NotImplementedError

    # ---- device ------------------------------------------------------------------------------
    def load_head(self, path: Path) -> Head:
        return Head.load(path)

    def predictor(self, bundle, *, device=None, threads=None, head_version=None) -> ClassifierPredictor:
        entry = bundle.head_entry(head_version)
        session = bundle_session(bundle, bundle.model_file("backbone"), device=device, threads=threads)
        extractor = self.extractor_for(session, bundle.model_file("backbone"), bundle.manifest["backbone"], bundle.path)
        threshold = float(entry.get("unknown_threshold", bundle.manifest.get("thresholds", {}).get("unknown", 0.0)))
        return ClassifierPredictor(
            self,
            bundle,
            extractor,
            self.load_head(bundle.open_verified(entry["file"])),
            int(entry["version"]),
            threshold,
            self.load_drift(bundle, entry),
        )

    def load_drift(self, bundle, entry: dict):
        """The head version's drift reference (None for bundles made without one).

        Raises:
            BundleError: a damaged one (its hash was checked on load, so this is a bug or a foreign file).
        """
        if not entry.get("drift"):
            return None
        try:
            return load_drift_reference(bundle.open_verified(entry["drift"]))
        except ValueError as exc:
            raise BundleError(f"{bundle.path}: {exc}") from None

    def extractor_for(self, session, model_path: Path, backbone: dict, root: Path):
        raise NotImplementedError

    def extractor(
        self, model: Path, exported, *, runtime, device, providers, simulate=False, float_precision="f32", threads=None
    ):
        from ...core.sessions import open_session

        session = open_session(
            model,
            runtime=runtime,
            device=device,
            providers=providers,
            simulate=simulate,
            float_precision=float_precision,
            threads=threads,
        )
        return self.extractor_for(session, model, exported.to_dict(), exported.path.parent)

    def check_threshold(self, value) -> float:
        check_confidence(value)
        return float(value)

    def adapt(
        self,
        b,
        data,
        *,
        replace: bool = False,
        force: bool = False,
        tolerance_pp: float = 5.0,
        holdout: float = 0.25,
        seed: int = 0,
        strict: bool = False,
        dry_run: bool = False,
        quiet: bool = True,
        signer=None,
        **_,
    ) -> AdaptResult:

        t0 = time.perf_counter()
        items, skipped = self.scan(data, bundle=b, strict=strict)
        if not items:
            raise DataError(
                f"{data}: no usable labelled {self.items} ({len(skipped)} skipped); expected {self.layout_hint(data)}"
            )
        predictor = self.predictor(b)
        X_new = self.features(predictor.extractor, items, quiet=quiet, desc="adapt features")
        timings = {"features": round(time.perf_counter() - t0, 3)}
        return update_head(
            self,
            b,
            predictor.head,
            X_new,
            [s.label for s in items],
            data=data,
            skipped=skipped,
            replace=replace,
            force=force,
            tolerance_pp=tolerance_pp,
            holdout=holdout,
            seed=seed,
            dry_run=dry_run,
            timings=timings,
            t0=t0,
            signer=signer,
        )

    def layout_hint(self, data) -> str:
        return f"{data}/<class>/<image>"

    # ---- text for people -------------------------------------------------------------------
    def render_predictions(self, predictions: list[Prediction]) -> str:
        from ...core.console import safe

        lines = []
        for p in predictions:
            alts = "  ".join(f"{safe(l)} {q:.3f}" for l, q in p.top_k[1:])
            ood = f"\tOOD (drift p {p.drift_p:.3g}: unlike the training {self.items})" if p.ood else ""
            lines.append(self.prediction_line(p, safe) + (f"\t{alts}" if alts else "") + ood)
        return "\n".join(lines)

    def prediction_line(self, p: Prediction, safe) -> str:
        return f"{safe(p.item)}\t{safe(p.label)}\t{p.confidence:.3f}"

    def fit_figures(self, result) -> dict:
        return {"val": result.metrics, "train_accuracy": result.report["train_accuracy"]}

    def fit_lines(self, result) -> list[str]:
        counts = result.data.counts().values()
        n_val = sum(c["val"] for c in counts)
        lines = [
            f"data      {len(result.bundle.labels)} classes, {sum(c['train'] for c in counts)} train"
            + (f" / {n_val} holdout" if n_val else "")
            + f" {self.items} ({self.split_words(result)})"
        ]
        cf = result.report.get("crossfit") or {}
        head = result.bundle.manifest.get("metrics", {})
        choice = head.get("head_choice") or []
        if len(choice) > 1:
            lines.append(
                "head      " + ", ".join(_candidate_words(c) for c in choice) + " out of fold (class-balanced)"
            )
        if cf and not cf.get("folds"):
            lines.append(
                f"estimate  none: {cf.get('method')}; no {self.items[:-1]} can be held out, so nothing "
                "measures this head (add a second item to each class)"
            )
        cal = head.get("calibration") or {}
        if cal.get("method") == "temperature":
            lines.append(
                f"calibrated temperature {cal['temperature']:.3g} on {cal['items']} out-of-fold "
                f"{self.items} (calibration error {cal['ece_before']:.3f} -> {cal['ece_after']:.3f})"
            )
        return lines

    def split_words(self, result) -> str:
        split = result.report.get("split", {})
        cf = result.report.get("crossfit") or {}
        oof = f"every item scored out of fold: {cf.get('method')}" if cf.get("folds") else "no item can be held out"
        return {
            "grouped": f"grouped split, {split.get('val_groups')} of {split.get('groups')} groups held out; "
            f"training items {oof}",
            "explicit": f"your validation set, a true holdout; training items {oof}",
            "stratified": f"stratified random holdout; training items {oof}",
            "out-of-fold": oof,
        }.get(split.get("method"), oof)

    def fit_tail(self, result) -> list[str]:
        m = result.metrics
        if not m:
            return []
        title = (
            "holdout (your validation set)"
            if m.get("estimate") == "holdout"
            else f"out of fold ({(result.report.get('crossfit') or {}).get('method')}; each {self.items[:-1]} "
            "scored by a head trained without it)"
        )
        out = ["", self.render_metrics(m, title=title)]
        if m.get("oof"):
            o = m["oof"]
            lo, hi = o["accuracy_interval"]
            out.append(
                f"out of fold on the {o['n']} training {self.items}: {o['accuracy']:.2%} "
                f"(95% interval {lo:.1%}-{hi:.1%})"
            )
        return out

    def render_metrics(self, metrics: dict, title: str = "") -> str:
        text = format_metrics(metrics, title=title, items=self.items)
        g = metrics.get("groups")
        if not g:
            return text
        lines = ["", f"{'group':<24} {'accuracy':>9}  {'95% interval':>13}  n"]
        lines += [
            f"{r['group'][:24]:<24} {r['accuracy']:>9.1%}  {r['lower']:>6.1%}-{r['upper']:<6.1%}  {r['n']}"
            for r in g["groups"]
        ]
        return text + "\n".join(lines + [g["message"]])

    def render_adapt(self, r: AdaptResult, dry_run: bool) -> str:
        s, g = r.summary, r.summary["gate"]
        fmt = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        return "\n".join(
            [
                ("dry run: nothing written" if dry_run else f"head v{r.version} is now current in {r.bundle.path}"),
                f"labels        {', '.join(s['labels'])}"
                + (f"  (new: {', '.join(s['new_classes'])})" if s["new_classes"] else ""),
                f"known classes {fmt(g['old_known_accuracy'])} -> {fmt(g['new_known_accuracy'])} on held-out data",
                f"new {self.items:<9} {fmt(g['new_holdout_accuracy'])} held-out accuracy "
                f"({g['holdout_images']} {self.items})",
                f"gate          {'passed' if g['passed'] else 'FAILED (forced)' if g['forced'] else 'FAILED'}",
                f"time          {r.timings.get('features', 0):.2f} s features, "
                f"{r.timings.get('train', 0):.2f} s training",
            ]
        )

    def render_history(self, rows: list[dict]) -> str:
        lines = [f"{'':1} {'ver':>3}  {'created':<20}  {'source':<14} {'classes':>7}  {'val/holdout acc':>15}"]
        for e in rows:
            acc = e.get("val_accuracy")
            acc = (e.get("gate") or {}).get("new_holdout_accuracy") if acc is None else acc
            lines.append(
                f"{'*' if e['current'] else ' '} {e['version']:>3}  {e['created']:<20}  {e['source']:<14} "
                f"{len(e['labels']):>7}  {('%.1f%%' % (acc * 100)) if acc is not None else 'n/a':>15}"
            )
        return "\n".join(lines)

    def render_threshold(self, value: float, version: int, where: str) -> str:
        if value == 0:
            return f"'unknown' is off for head v{version} (the current version) in {where}"
        return (
            f"predictions under {value:.2f} confidence are now 'unknown' "
            f"for head v{version} (the current version) in {where}"
        )
