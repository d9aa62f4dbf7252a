"""The server side of a fleet round, engine-free: :class:`Merger` turns the devices' checked
summaries (:mod:`edgetl.fleet.summaries`) into one head, step by step; :func:`run_local` runs a
whole round in one process (tests, benchmarks, the simulation's reference)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _edgetl as et
from ._edgetl import FleetError
from .summaries import (
    MAX_ROWS,
    Step,
    Summary,
    check_summary,
    respond,
)

# ================================================================ leave-one-device-out labels
# A device is left out when the class means of fewer than this share of its rows are nearest to
# their own class among the other devices' class means.
MIN_AGREEMENT = 0.5


def label_agreement(ok: dict, second: str) -> tuple[dict, dict]:
    """(per device: the share of its rows whose class mean is nearest, among the *other* devices'
    class means, to its own class; the devices to leave out, with their reasons).

    A summary with wrong labels (swapped classes, another product under a known name) is
    self-consistent, so :func:`edgetl.fleet.summaries.check_summary` cannot see it; what gives it
    away is that the others' data says its "class a" looks like their class b. Class means of tens
    of rows sit far closer to their class's centre than classes sit to each other (their noise
    shrinks as 1/sqrt(rows)), so an honest device scores near 1 and a device with swapped labels
    near 0; the cut at 0.5 is far from both. Devices are left out one at a time, the worst first,
    and the rest re-scored without it (a poisoned device also skews its partners' references);
    at most a minority is ever left out, and only with at least two devices left to compare
    against. Classes no other device holds carry no evidence and are not scored. Features are
    standardised with the round's own mean and spread (which do not depend on labels).
    """
    if len(ok) < 3:
        return {}, {}
    labels = sorted({l for s in ok.values() for l in s.meta["labels"]})
    pos = {l: i for i, l in enumerate(labels)}
    k, d = len(labels), next(iter(ok.values())).arrays["sum"].shape[1]
    per, n, total, sq = {}, 0, np.zeros(d), np.zeros(d)
    for who, s in ok.items():
        c, S = np.zeros(k), np.zeros((k, d))
        idx = np.array([pos[l] for l in s.meta["labels"]], np.int64)
        c[idx] = np.asarray(s.arrays["count"], np.float64)
        S[idx] = np.asarray(s.arrays["sum"], np.float64)
        per[who] = (c, S)
        n += c.sum()
        total += S.sum(axis=0)
        sec = np.asarray(s.arrays[second], np.float64)
        sq += np.diag(sec) if sec.ndim == 2 else sec
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    scale = np.where(std > 1e-12, std, 1.0)
    active, out, scores = set(ok), {}, {}
    while len(active) >= 3 and len(out) < (len(ok) - 1) // 2:
        C_all = sum(per[w][0] for w in active)
        S_all = sum(per[w][1] for w in active)
        scores = {}
        for who in sorted(active):
            c, S = per[who]
            C, Sx = C_all - c, S_all - S
            have = np.flatnonzero(C > 0)
            if len(have) < 2:
                continue
            cent = (Sx[have] / C[have, None] - mean) / scale
            rows = agree = 0.0
            for j in np.flatnonzero((c > 0) & (C > 0)):
                m = (S[j] / c[j] - mean) / scale
                nearest = have[int(np.argmin(((cent - m) ** 2).sum(axis=1)))]
                rows += c[j]
                agree += c[j] * (nearest == j)
            if rows:
                scores[who] = (agree / rows, int(rows))
        if not scores:
            break
        worst = min(scores, key=lambda w: scores[w][0])
        share, rows = scores[worst]
        if share >= MIN_AGREEMENT:
            break
        out[worst] = (
            f"{worst}: summary refused: its class means agree with the other devices' data for only "
            f"{share:.0%} of its {rows} rows of shared classes (leave-one-device-out check; labels "
            "swapped, or images of another product?)"
        )
        active.discard(worst)
    agreement = {w: round(v[0], 4) for w, v in scores.items()}
    return agreement, out


# ============================================================================================ server
@dataclass
class Refusal:
    device: str
    step: str
    reason: str


@dataclass
class FleetResult:
    """The merged head and where it came from."""

    kind: str
    head: object  # an edgetl Head (classification) or AnomalyHead
    provenance: dict


class Merger:
    """The server side of one fleet round for one merge (engine-free).

    Usage::

        m = Merger("ridge")
        for i in range(m.n_steps):
            step = m.step(i)
            m.absorb(step, {device_id: respond(step, local_data_of[device_id]) ...})
        result = m.result()

    What differs between merges (steps, broadcasts, checks, merge, head) is the registered merge's
    (:mod:`edgetl.fleet.merges`, :func:`edgetl.heads.registry.fleet_merge`); this class keeps the
    round: settings, state, the devices taking part and the refusals.

    Args:
        kind: a registered fleet merge (``ridge``, ``prototype``, ``linear``, ``mlp``, ``padim``,
            ``patchcore``, or a kind that merges itself).
        labels: the label order to start from (the bundle's labels); classes the devices add
            follow, sorted. ``allow_new_classes=False`` refuses a device naming any other label.
        rounds / local_steps / lr / server_lr / l2 / hidden / seed: the FedAvg kinds' settings.
        anomaly_template: the server bundle's current anomaly head (config, grid, channels).
        min_devices: the round fails when fewer devices pass the checks.
    """

    def __init__(
        self,
        kind: str,
        *,
        labels: list[str] | None = None,
        allow_new_classes: bool = True,
        l2: float | None = None,
        rounds: int = 30,
        local_steps: int = 1,
        lr: float = 1.0,
        server_lr: float = 0.01,
        hidden: int = 256,
        seed: int = 0,
        anomaly_template=None,
        min_devices: int = 1,
        max_rows: int = MAX_ROWS,
    ):
        self.merge = et.fleet_merge(kind)
        if self.merge.anomaly and anomaly_template is None:
            raise FleetError(f"a {kind} round needs the server bundle's anomaly head")
        self.kind = kind
        self.base_labels = list(labels or [])
        self.allow_new = allow_new_classes
        self.l2, self.rounds, self.local_steps, self.lr, self.server_lr = l2, rounds, local_steps, lr, server_lr
        self.hidden, self.seed, self.template = hidden, seed, anomaly_template
        self.min_devices, self.max_rows = min_devices, max_rows
        self.refused: list[Refusal] = []
        self.devices: dict[str, dict] = {}  # per device: rows, class counts (from the first step)
        self.state: dict = {}
        self.steps_done: list[str] = []
        self._names = list(self.merge.fleet_steps(self))

    @property
    def n_steps(self) -> int:
        return len(self._names)

    def refuse(self, who, step: str, reason: str) -> None:
        """Record that ``who``'s summary for ``step`` is left out of the merge, and why."""
        self.refused.append(Refusal(str(who), step, reason))

    # ---------------------------------------------------------------- broadcast
    def step(self, i: int) -> Step:
        name = self._names[i]
        config, arrays = self.merge.fleet_broadcast(self, name, i)
        return Step(self.kind, name, i, config, arrays)

    # ---------------------------------------------------------------- merge
    def absorb(self, step: Step, replies: dict) -> list[Refusal]:
        """Check each device's summary for ``step`` and fold the valid ones into the state.

        ``replies`` maps a device id to its :class:`Summary` (or an exception it raised).
        Returns this step's refusals (also kept in :attr:`refused`).

        Raises:
            FleetError: fewer than ``min_devices`` valid summaries remain.
        """
        ok: dict[str, Summary] = {}
        new_refusals = []
        # a round of several steps counts the devices of its first step; later answers come from them
        tracked = step.index > 0 and not self.merge.anomaly
        for who, s in replies.items():
            try:
                if isinstance(s, BaseException):
                    raise FleetError(f"{who}: {s}")
                if tracked and who not in self.devices:
                    raise FleetError(f"{who}: did not take part in the first step of this round")
                ok[who] = check_summary(
                    s,
                    step,
                    who=who,
                    d=self.state.get("d"),
                    labels=self._expect_labels(step),
                    max_rows=self.max_rows,
                    geometry=self._geometry(),
                )
            except FleetError as exc:
                new_refusals.append(Refusal(str(who), step.name, str(exc)))
        self.refused += new_refusals
        if tracked:
            for who in list(self.devices):  # a device that dropped out mid-round is no longer counted
                if who not in ok:
                    self.devices[who]["completed"] = False
        if len(ok) < self.min_devices:
            raise FleetError(
                f"step {step.name}: {len(ok)} valid device summaries, at least {self.min_devices} needed"
                + (f" (refused: {new_refusals[0].reason})" if new_refusals else "")
            )
        self.merge.fleet_absorb(self, step, ok)
        self.steps_done.append(step.name)
        return new_refusals

    def _expect_labels(self, step: Step):
        if self.merge.anomaly:
            return None
        if step.index == 0:
            return None if self.allow_new or not self.base_labels else self.base_labels
        return self.state["labels"]

    def _geometry(self) -> dict:
        if self.template is None:
            return {}
        tiles = self.template.meta.get("tiles")
        return {**self.merge.fleet_geometry(self.template), **({"tiles": str(tiles)} if tiles is not None else {})}

    # ---------------------------------------------------------------- result
    def result(self) -> FleetResult:
        """The merged head (an edgetl head object) and its provenance."""

        if len(self.steps_done) != self.n_steps:
            raise FleetError(f"the round stopped after {len(self.steps_done)} of {self.n_steps} steps")
        prov = {
            "kind": self.kind,
            "steps": list(self._names),
            "devices": self.devices,
            "refused": [r.__dict__ for r in self.refused],
            **({"label_agreement": self.state["agreement"]} if self.state.get("agreement") else {}),
        }
        head = self.merge.fleet_result(self, prov)
        tiles = None if self.template is None else self.template.meta.get("tiles")
        if tiles is not None:  # the merged head scores frames of the plan its parts were cut by
            head.meta = {**head.meta, "tiles": tiles}
            prov["tiles"] = tiles
        return FleetResult(self.kind, head, prov)


def run_local(merger: Merger, participants: dict, *, templates: dict | None = None) -> FleetResult:
    """Run every step of ``merger`` against in-process participants (``{id: LocalData}``): the
    engine-free round the unit tests, ``simulate --engine none`` and the central reference use."""
    templates = templates or {}
    for i in range(merger.n_steps):
        step = merger.step(i)
        replies = {}
        for who, data in participants.items():
            try:
                replies[who] = respond(step, data, head_template=templates.get(who, merger.template))
            except FleetError as exc:
                replies[who] = exc
        merger.absorb(step, replies)
    return merger.result()
