"""The device side of a fleet round, without any engine: summarise local data, judge a global head.

A :class:`Device` is a bundle plus a folder of the device's own labelled images (defect bundles:
good images). Its images go through the bundle's own backbone once; a stratified quarter is held
out (``adapt``'s split, same seed rule) and never summarised, so the gate judges the global head on
images it was not built from. Summaries (:func:`edgetl.fleet.summaries.respond`) come from the rest.

:meth:`Device.consider` is the only way a global head gets into the bundle, and it is the same
discipline as ``edgetl adapt``: under the bundle's writer lock, the current head and the global
head are scored on the held-out images; the global head is **refused** (the current version stays,
:class:`edgetl.errors.GateError`, exit 3) when its held-out accuracy is more than ``tolerance_pp``
points below the current head's, when it has lost a class the current head knows, or when there is
no held-out image to judge it on (``force`` accepts anyway; ``dry_run`` only reports). Accepted, it
is written as a new head version (``heads/vN.npz``, replay memory ``exemplars/vN.npz`` refreshed by
herding over the old memory plus the local images, fused ``model-vN.*``) and made current by one
atomic manifest switch, with ``source: "fleet"``; ``edgetl rollback`` undoes it. Defect bundles
compare false alarms on held-out good images at the current threshold (carried over, as their
``adapt`` does).

What arrives from the server is arrays and a few JSON numbers and names; they are checked (shapes,
finiteness, label lists) and used as head weights. Nothing received is executed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _edgetl as et
from .summaries import FleetError, LocalData, Step, Summary, respond

HOLDOUT = 0.25
DEFAULT_TOLERANCE_PP = 5.0


@dataclass
class Device:
    """One device's view of a round: its bundle, its local data split into summarised / held out."""

    bundle: Path
    name: str
    task: str
    train: LocalData
    heldout: LocalData
    template: object = None  # the current anomaly head (config, grid, channels), for anomaly bundles
    images: int = 0
    skipped: list = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(
        cls,
        bundle,
        data,
        *,
        name: str | None = None,
        holdout: float = HOLDOUT,
        seed: int = 0,
        strict: bool = False,
        quiet: bool = True,
    ) -> Device:
        """Load ``bundle`` (verified), read ``data`` and extract its features through the bundle's
        backbone. Raises :class:`edgetl.errors.DataError` / ``BundleError`` with one line."""
        b = et.load_bundle(bundle)
        if et.task_of(b.task).one_class:
            paths = et.good_images(data, strict=strict)
            if not paths:
                raise et.DataError(f"{data}: no readable good images for this device")
            F = et.patch_features(b, paths, quiet=quiet)
            return cls.from_features(
                b.path,
                patches=F,
                name=name,
                holdout=holdout,
                seed=seed,
                template=et.current_head(b),
                task=b.task,
                rows_per_image=et.tiles_per_image(b),
                overview=et.has_overview(b),
            )
        X, labels, skipped = et.labelled_features(b, data, strict=strict, quiet=quiet)
        dev = cls.from_features(b.path, X=X, labels=labels, name=name, holdout=holdout, seed=seed, task=b.task)
        dev.skipped = skipped
        return dev

    @classmethod
    def from_features(
        cls,
        bundle,
        *,
        X=None,
        labels=None,
        patches=None,
        name=None,
        holdout: float = HOLDOUT,
        seed: int = 0,
        template=None,
        task: str | None = None,
        rows_per_image: int = 1,
        overview: bool = False,
    ) -> Device:
        """A device from already extracted features (tests, ``simulate``): same split, same gate.
        ``rows_per_image``: patch rows per image (a tiled bundle's tiles: a frame is held out or
        summarised whole, as adapt's held-out normalisation keeps a frame's tiles together).
        ``overview``: each frame's last row is its whole-frame view, scored on the held-out frames
        but never summarised into the shared patch memory (it has a memory of its own)."""
        bundle = Path(bundle)
        name = name or bundle.name
        if patches is not None:
            F = np.asarray(patches, np.float32)
            k = max(1, int(rows_per_image))
            n = len(F) // k
            rng = np.random.default_rng(seed)
            hold_img = np.zeros(n, bool)
            if n >= 2:
                hold_img[rng.choice(n, max(1, int(round(n * holdout))), replace=False)] = True
            hold = np.repeat(hold_img, k)
            train = F[~hold]
            if overview:  # the tiles only: the overview row is another scale of the part
                train = train.reshape(-1, k, *F.shape[1:])[:, : k - 1].reshape(-1, *F.shape[1:])
            return cls(
                bundle,
                name,
                task or et.load_bundle(bundle).task,
                LocalData.anomaly(train),
                LocalData(F=F[hold]),
                template=template,
                images=n,
            )
        X = np.asarray(X, np.float32)
        labels = [str(l) for l in labels]
        names = sorted(set(labels))
        y = np.array([names.index(l) for l in labels])
        hold = et.holdout_mask(y, holdout, seed) if holdout > 0 else np.zeros(len(y), bool)
        lab = np.array(labels, dtype=object)
        train = LocalData.classify(X[~hold], lab[~hold].tolist())
        held = LocalData(X=X[hold], labels=lab[hold].tolist())
        return cls(bundle, name, task or et.load_bundle(bundle).task, train, held, images=len(labels))

    # ------------------------------------------------------------------ rounds
    def respond(self, step: Step) -> Summary:
        """This device's summary for ``step`` (from the non-held-out part of its data)."""
        if et.fleet_merge(step.kind).anomaly != et.task_of(self.task).one_class:
            raise FleetError(f"{self.name}: a {step.kind} round does not fit this {self.task} bundle")
        return respond(step, self.train, head_template=self.template)

    def all_features(self) -> tuple[np.ndarray, list[str]]:
        return (
            np.concatenate([self.train.X, self.heldout.X.reshape(-1, self.train.X.shape[1])]),
            list(self.train.labels) + list(self.heldout.labels or []),
        )

    # ------------------------------------------------------------------ the gate
    def consider(
        self,
        kind: str,
        labels: list[str],
        arrays: dict,
        meta: dict | None = None,
        *,
        provenance: dict | None = None,
        tolerance_pp: float = DEFAULT_TOLERANCE_PP,
        force: bool = False,
        dry_run: bool = False,
        wait: float = 0.0,
        signer=None,
        signature: dict | None = None,
    ) -> dict:
        """Gate a global head on the held-out data; accept it as a new version or refuse it.

        Where this device has a trust policy (``EDGETL_TRUST``), the head must carry the fleet
        server's ``signature`` by a key the policy trusts for ``fleet``; otherwise it is refused
        before anything else (exit 5).

        Returns the decision (``accepted``, ``version``, the held-out figures, ``reasons``).

        Raises:
            GateError: refused (and not ``force``): the current version stays current.
            FleetError: the arrays do not make a head for this bundle.
            BundleBusy / BundleError: as ``edgetl adapt``.
        """
        policy = et.policy_from_env()
        if policy is not None:
            doc = {
                "kind": kind,
                "labels": list(labels),
                "meta": meta or {},
                "provenance": provenance or {},
                "signature": signature,
            }
            et.verify_delivery(policy, doc, arrays, str(self.bundle))
        if not (isinstance(tolerance_pp, (int, float)) and 0 <= tolerance_pp <= 100):
            raise et.ConfigError(f"tolerance {tolerance_pp!r}: give percentage points between 0 and 100")
        ctx = et.for_update(self.bundle, operation="adapt (fleet)", wait=wait) if not dry_run else None
        if ctx is None:
            return self._consider(
                et.load_bundle(self.bundle), kind, labels, arrays, meta, provenance, tolerance_pp, force, True, signer
            )
        with ctx as b:
            return self._consider(b, kind, labels, arrays, meta, provenance, tolerance_pp, force, False, signer)

    def _consider(self, b, kind, labels, arrays, meta, provenance, tol, force, dry_run, signer) -> dict:
        current = et.current_head(b)
        task = et.task_of(b.task)
        if task.one_class:
            head, decision = self._gate_anomaly(b, current, kind, arrays, tol, meta)
        else:
            head, decision = self._gate_classify(current, kind, labels, arrays, meta, tol)
        decision.update(device=self.name, current_version=b.head_version, tolerance_pp=tol, forced=False)
        if decision["reasons"] and not force:
            decision["accepted"] = False
            if dry_run:
                return decision
            raise et.GateError(
                f"global head refused, v{b.head_version} stays current: "
                + "; ".join(decision["reasons"])
                + " (--force to accept)"
            )
        decision["forced"] = bool(decision["reasons"])
        if dry_run:
            decision["accepted"] = False
            return decision
        entry = {
            "source": "fleet",
            "fleet": {"provenance": provenance or {}, "gate": dict(decision)},
            "images": self.images,
            "parent": b.head_version,
        }
        exemplars = None
        if not task.one_class:
            exemplars = self._new_exemplars(b, head)
        new, version = et.write_head_version(b, head, entry=entry, exemplars=exemplars, signer=signer)
        decision.update(accepted=True, version=version)
        return decision

    def _gate_classify(self, current, kind, labels, arrays, meta, tol):
        head = et.head_from_arrays(et.fleet_merge(kind).head_kind, labels, arrays, meta)
        if head.n_features != current.n_features:
            raise FleetError(
                f"global head expects {head.n_features} features; this bundle's backbone gives {current.n_features}"
            )
        Xh = self.heldout.X
        yh = list(self.heldout.labels or [])
        reasons = []
        # a class "known" to a head: in its label list and not marked absent (no training rows)
        absent = (meta or {}).get("absent_classes", [])
        absent = {a for a in absent if isinstance(a, str)} if isinstance(absent, list) else set()
        knows = set(current.labels) - set(current.meta.get("absent_classes", []) or [])
        lost = sorted(knows - (set(head.labels) - absent))
        if lost:
            reasons.append(f"it does not know classes this device's head knows: {lost[:5]}")

        def acc(h):
            if not yh:
                return None
            pred = np.array(h.labels, dtype=object)[h.predict(Xh)]
            return float(np.mean(pred == np.array(yh, dtype=object)))

        before, after = acc(current), acc(head)
        if before is None:
            reasons.append("no held-out images on this device to judge it on (give more images per class)")
        elif (before - after) * 100 > tol:
            reasons.append(
                f"held-out accuracy on this device would fall from {before:.1%} to {after:.1%} (tolerance {tol:g} pp)"
            )
        return head, {"heldout_images": len(yh), "accuracy_before": before, "accuracy_after": after, "reasons": reasons}

    def _gate_anomaly(self, b, current, kind, arrays, tol, meta=None):
        merge = et.fleet_merge(kind)
        if merge.head_kind != current.kind:
            raise FleetError(f"global head is {kind}; this bundle runs {current.kind}")
        sent = (meta or {}).get("tiles")
        if sent is not None and sent != current.meta.get("tiles"):
            raise et.GateError(
                f"global head refused, v{b.head_version} stays current: it was merged from frames tiled as "
                f"{sent}; this bundle tiles them as {current.meta.get('tiles')} (fitted on frames of another size)"
            )
        clean = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
                raise FleetError(f"global head array {name!r} is not finite numbers")
            clean[name] = a
        merge.gate_arrays(current, clean)
        head = et.anomaly_head_like(current, clean)
        threshold = float(
            b.head_entry().get("threshold", b.manifest.get("thresholds", {}).get(et.task_of(b.task).threshold_key, 1.0))
        )
        F = self.heldout.F
        reasons = []
        if F is None or len(F) == 0:
            reasons.append("no held-out good images on this device to judge it on")
            before = after = None
        else:
            before = float(np.mean(et.anomaly_scores(b, current, F) >= threshold))
            after = float(np.mean(et.anomaly_scores(b, head, F) >= threshold))
            if (after - before) * 100 > tol:
                reasons.append(
                    f"false alarms on held-out good images would rise from {before:.1%} to {after:.1%} "
                    f"(tolerance {tol:g} pp)"
                )
        return head, {
            "heldout_images": 0 if F is None else len(F) // et.tiles_per_image(b),
            "false_alarms_before": before,
            "false_alarms_after": after,
            "threshold": threshold,
            "reasons": reasons,
        }

    def _new_exemplars(self, b, head):
        """Replay memory of the new version: herding over the old memory plus all local images."""
        Xo, yo, names = et.load_exemplars(b)
        pos = {l: i for i, l in enumerate(head.labels)}
        keep = np.array([names[i] in pos for i in yo], bool) if len(yo) else np.zeros(0, bool)
        X_loc, lab_loc = self.all_features()
        known = np.array([l in pos for l in lab_loc], bool)
        X = np.concatenate([Xo[keep], X_loc[known]])
        y = np.concatenate(
            [
                np.array([pos[names[i]] for i in yo[keep]], np.int64),
                np.array([pos[l] for l, k in zip(lab_loc, known) if k], np.int64),
            ]
        )
        per_class = int(b.manifest.get("exemplars", {}).get("per_class", 20))
        idx = et.herding(X, y, len(head.labels), per_class=per_class)
        return X[idx], y[idx], list(head.labels)


def base_participant(bundle) -> tuple[str, object]:
    """What the server bundle itself already knows, as one more participant of the round:
    classification: its replay exemplars (features the server holds anyway); PaDiM: the current
    head's moments; PatchCore: the current memory bank. Returns (name, LocalData or Summary maker)."""
    b = et.load_bundle(bundle)
    if et.task_of(b.task).one_class:
        return "server-bundle", _HeadParticipant(et.current_head(b))
    X, y, names = et.load_exemplars(b)
    if len(y) == 0:
        raise FleetError(f"{b.path}: has no replay exemplars to include; use --base none")
    return "server-exemplars", LocalData.classify(X, [names[i] for i in y])


class _HeadParticipant:
    """An anomaly head's own statistics as a participant (what the factory fit learned)."""

    def __init__(self, head):
        self.head = head

    def summary(self, step: Step) -> Summary:
        h = self.head
        merge = et.fleet_merge(step.kind)
        if merge.head_kind != h.kind:
            raise FleetError(f"the server bundle runs {h.kind}, not {step.kind}")
        s = merge.own_summary(h)
        if "tiles" in h.meta:  # its memory holds tiles of its own plan
            s.meta["tiles"] = str(h.meta["tiles"])
        return s


def answer(participant, step: Step, template=None) -> Summary:
    """A participant's summary: a :class:`Device`, a :class:`LocalData` or a head participant."""
    if isinstance(participant, Device):
        return participant.respond(step)
    if isinstance(participant, _HeadParticipant):
        return participant.summary(step)
    return respond(step, participant, head_template=template)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
