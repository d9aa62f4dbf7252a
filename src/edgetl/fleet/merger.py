"""The server side of a fleet round, engine-free: :class:`Merger` turns the devices' checked
summaries (:mod:`edgetl.fleet.summaries`) into one head, step by step; :func:`run_local` runs a
whole round in one process (tests, benchmarks, the simulation's reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _edgetl as et
from . import ridge as _ridge
from ._edgetl import FleetError
from .summaries import (
    ABSENT_MARGIN,
    ANOMALY_KINDS,
    CLASSIFY_KINDS,
    KINDS,
    MAX_ROWS,
    PROTO_NORM_EPS,
    PROTO_T_BOUNDS,
    PROTO_T_DEFAULT,
    TEMPERATURE_POINTS,
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
    """The server side of one fleet round for one head kind (engine-free).

    Usage::

        m = Merger("ridge")
        for i in range(m.n_steps):
            step = m.step(i)
            m.absorb(step, {device_id: respond(step, local_data_of[device_id]) ...})
        result = m.result()

    Args:
        kind: one of :data:`KINDS`.
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
        if kind not in KINDS:
            raise FleetError(f"head kind {kind!r} has no fleet merge; choose one of {', '.join(KINDS)}")
        if kind in ANOMALY_KINDS and anomaly_template is None:
            raise FleetError(f"a {kind} round needs the server bundle's anomaly head")
        if kind in ("linear", "mlp") and not (1 <= rounds <= 10_000):
            raise FleetError(f"rounds must be 1..10000, got {rounds}")
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
        if kind == "ridge":
            self._names = ["moments", "temperature-a", "temperature-b"]
        elif kind == "prototype":
            self._names = ["moments", "unit-sums", "temperature-a", "temperature-b"]
        elif kind in ("linear", "mlp"):
            self._names = ["moments"] + ["fedavg"] * rounds
        else:
            self._names = [kind]

    @property
    def n_steps(self) -> int:
        return len(self._names)

    # ---------------------------------------------------------------- broadcast
    def step(self, i: int) -> Step:
        name = self._names[i]
        st = self.state
        if name == "moments":
            cfg = {"gram": self.kind == "ridge"}
            if not self.allow_new and self.base_labels:
                cfg["labels"] = self.base_labels
            return Step(self.kind, name, i, cfg, {})
        if name == "unit-sums":
            return Step(self.kind, name, i, {"labels": st["labels"]}, {"mean": st["mean32"]})
        if name.startswith("temperature"):
            grid = st["grid_a"] if name == "temperature-a" else st["grid_b"]
            cfg = {"labels": st["labels"], "grid": [float(v) for v in grid]}
            if self.kind == "prototype":
                arrays = {"mean": st["mean32"], "sums": st["unit_sums"].T.copy(), "class_weight": st["class_weight"]}
            else:
                f = st["fit"]
                arrays = {
                    "mean": f["mean"],
                    "scale": f["scale"],
                    "W": f["W"],
                    "b": f["b"],
                    "M": f["M"],
                    "offset": f["offset"],
                    "present": f["present"].astype(np.int8),
                }
                cfg["n"] = int(f["n"])
            return Step(self.kind, name, i, cfg, arrays)
        if name == "fedavg":
            cfg = {"labels": st["labels"], "local_steps": self.local_steps, "lr": self.lr, "l2": st["l2"]}
            arrays = {
                "mean": st["mean32"],
                "scale": st["scale32"],
                "class_weight": st["class_weight"],
                **{n: v.astype(np.float32) for n, v in st["params"].items()},
            }
            return Step(self.kind, name, i, cfg, arrays)
        tpl = self.template
        arrays = {"channels": np.asarray(tpl.arrays["channels"], np.int64)} if self.kind == "padim" else {}
        return Step(self.kind, name, i, {}, arrays)

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
        for who, s in replies.items():
            try:
                if isinstance(s, BaseException):
                    raise FleetError(f"{who}: {s}")
                if step.index > 0 and step.kind in CLASSIFY_KINDS and who not in self.devices:
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
        if step.index > 0 and step.kind in CLASSIFY_KINDS:
            for who in list(self.devices):  # a device that dropped out mid-round is no longer counted
                if who not in ok:
                    self.devices[who]["completed"] = False
        if len(ok) < self.min_devices:
            raise FleetError(
                f"step {step.name}: {len(ok)} valid device summaries, at least {self.min_devices} needed"
                + (f" (refused: {new_refusals[0].reason})" if new_refusals else "")
            )
        getattr(
            self,
            "_absorb_" + step.name.replace("-", "_").split("_")[0]
            if step.kind in CLASSIFY_KINDS
            else "_absorb_" + step.kind,
        )(step, ok)
        self.steps_done.append(step.name)
        return new_refusals

    def _expect_labels(self, step: Step):
        if step.kind in ANOMALY_KINDS:
            return None
        if step.name == "moments":
            return None if self.allow_new or not self.base_labels else self.base_labels
        return self.state["labels"]

    def _geometry(self) -> dict:
        t = self.template
        if t is None:
            return {}
        if self.kind == "padim":
            return {"P": int(t.grid[0] * t.grid[1]), "dims": len(t.arrays["channels"])}
        return {"channels_in": int(t.channels_in), "max_memory": int(t.config.max_memory)}

    def _absorb_moments(self, step: Step, ok: dict) -> None:
        widths = {who: s.arrays["sum"].shape[1] for who, s in ok.items()}
        d = max(set(widths.values()), key=list(widths.values()).count)
        for who in [w for w, v in widths.items() if v != d]:  # the minority width is refused
            self.refused.append(
                Refusal(who, step.name, f"{who}: summary refused: {widths[who]} features, the round has {d}")
            )
            del ok[who]
        if len(ok) < self.min_devices:
            raise FleetError(f"step moments: {len(ok)} devices agree on the feature width, {self.min_devices} needed")
        agreement, outliers = label_agreement(ok, "gram" if self.kind == "ridge" else "sumsq")
        self.state["agreement"] = agreement
        for who, reason in outliers.items():
            self.refused.append(Refusal(who, step.name, reason))
            del ok[who]
        if len(ok) < self.min_devices:
            raise FleetError(
                f"step moments: {len(ok)} devices left after the label check, {self.min_devices} needed "
                f"(refused: {next(iter(outliers.values()))})"
            )
        new = sorted({l for s in ok.values() for l in s.meta["labels"]} - set(self.base_labels))
        labels = self.base_labels + new
        pos = {l: i for i, l in enumerate(labels)}
        k = len(labels)
        n = 0
        counts = np.zeros(k, np.int64)
        sums = np.zeros((k, d))
        second = np.zeros((d, d)) if self.kind == "ridge" else np.zeros(d)
        for who, s in sorted(ok.items()):
            idx = np.array([pos[l] for l in s.meta["labels"]], np.int64)
            c = np.asarray(s.arrays["count"], np.int64)
            counts[idx] += c
            sums[idx] += np.asarray(s.arrays["sum"], np.float64)
            second += np.asarray(s.arrays["gram" if self.kind == "ridge" else "sumsq"], np.float64)
            n += int(s.meta["n"])
            self.devices[str(who)] = {
                "rows": int(s.meta["n"]),
                "completed": True,
                "class_counts": {l: int(v) for l, v in zip(s.meta["labels"], c.tolist())},
            }
        if np.count_nonzero(counts) < 2:
            raise FleetError(f"the devices' data covers {np.count_nonzero(counts)} class; a classifier needs 2")
        st = self.state
        st.update(d=d, labels=labels, n=n, counts=counts, class_sums=sums)
        present = counts > 0
        cw = np.zeros(k)
        cw[present] = n / (present.sum() * counts[present])  # edgetl's balanced class weights
        st["class_weight"] = cw
        if self.kind == "ridge":
            st["fit"] = _ridge.ridge_from_moments(n, sums.sum(axis=0), second, counts, sums, l2=self.l2)
            st["grid_a"] = _ridge.temperature_grid(*_ridge.RIDGE_T_BOUNDS, TEMPERATURE_POINTS)
            return
        mean64, mean32, scale32 = _ridge.standardisation(n, sums.sum(axis=0), second)
        st.update(mean64=mean64, mean32=mean32, scale32=scale32)
        if self.kind == "prototype":
            return
        st["l2"] = 1e-2 if self.l2 is None else float(self.l2)
        st["params"] = self._start_params(mean64, scale32, sums, counts)
        st["adam"] = {nm: (np.zeros_like(v), np.zeros_like(v)) for nm, v in st["params"].items()}
        st["t"] = 0

    def _start_params(self, mean64, scale32, sums, counts) -> dict:
        d, k = len(mean64), len(counts)
        present = counts > 0
        if self.kind == "linear":
            # FedNCM: class means on the shared standardisation as the weights, cosine-scaled
            means = np.zeros((k, d))
            means[present] = (sums[present] / counts[present, None] - mean64) / scale32.astype(np.float64)
            norms = np.linalg.norm(means, axis=1, keepdims=True)
            W = np.where(norms > 0, means / np.maximum(norms, 1e-12), 0.0).T * (10.0 / math.sqrt(d))
            b = np.where(present, 0.0, -ABSENT_MARGIN)
            return {"W": W, "b": b}
        rng = np.random.default_rng(self.seed)
        W1 = rng.standard_normal((d, self.hidden)) * math.sqrt(2.0 / d)
        W2 = rng.standard_normal((self.hidden, k)) * math.sqrt(1.0 / self.hidden)
        return {"W1": W1, "b1": np.zeros(self.hidden), "W2": W2, "b2": np.where(present, 0.0, -ABSENT_MARGIN)}

    def _absorb_unit(self, step: Step, ok: dict) -> None:
        st = self.state
        sums = np.zeros((len(st["labels"]), st["d"]))
        for s in ok.values():
            sums += np.asarray(s.arrays["sum"], np.float64)
        st["unit_sums"] = sums
        st["grid_a"] = _ridge.temperature_grid(*PROTO_T_BOUNDS, TEMPERATURE_POINTS)

    def _absorb_temperature(self, step: Step, ok: dict) -> None:
        st = self.state
        grid = st["grid_a"] if step.name == "temperature-a" else st["grid_b"]
        slope = sum(np.asarray(s.arrays["slope"], np.float64) for s in ok.values())
        curv = sum(np.asarray(s.arrays["curv"], np.float64) for s in ok.values())
        rows = sum(int(s.meta["rows"]) for s in ok.values())
        cols = int(np.count_nonzero(st["counts"] > 0))
        if rows == 0 or cols < 2:
            st["temperature"] = PROTO_T_DEFAULT if self.kind == "prototype" else 1.0
            st["grid_b"] = grid
            return
        if step.name == "temperature-a":
            br = _ridge.bracket(grid, slope)
            if isinstance(br, float):
                st["temperature"] = br
                st["grid_b"] = np.linspace(br, br + 1e-9, TEMPERATURE_POINTS)  # answers are ignored
                st["fixed"] = True
            else:
                st["grid_b"] = _ridge.temperature_grid(br[0], br[1], TEMPERATURE_POINTS)
            return
        if not st.get("fixed"):
            st["temperature"] = _ridge.solve_temperature(grid, slope, curv)

    def _absorb_fedavg(self, step: Step, ok: dict) -> None:
        st = self.state
        total = sum(float(s.meta["weight"]) for s in ok.values())
        st["t"] += 1
        t, b1, b2, eps = st["t"], 0.9, 0.999, 1e-8
        for name, cur in st["params"].items():
            avg = sum(np.asarray(s.arrays[name], np.float64) * (float(s.meta["weight"]) / total) for s in ok.values())
            delta = cur - avg  # the pseudo-gradient of FedAvg (= lr * gradient when local_steps = 1)
            m, v = st["adam"][name]
            m = b1 * m + (1 - b1) * delta
            v = b2 * v + (1 - b2) * delta * delta
            st["adam"][name] = (m, v)
            st["params"][name] = cur - self.server_lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)

    def _absorb_padim(self, step: Step, ok: dict) -> None:

        dims = len(self.template.arrays["channels"])
        iu = np.triu_indices(dims)
        acc = None
        for who, s in sorted(ok.items()):
            tri = np.asarray(s.arrays["m2_triu"], np.float64)
            m2 = np.zeros((tri.shape[0], dims, dims))
            m2[:, iu[0], iu[1]] = tri
            m2[:, iu[1], iu[0]] = tri
            part = (np.asarray(s.arrays["mean"], np.float64), m2, int(s.meta["images"]))
            acc = part if acc is None else et.merge_moments(*acc, *part)
            self.devices[str(who)] = {"images": int(s.meta["images"]), "completed": True}
        self.state["moments"] = acc

    def _absorb_patchcore(self, step: Step, ok: dict) -> None:
        mems, patches, images = [], 0, 0
        for who, s in sorted(ok.items()):
            mems.append(np.asarray(s.arrays["memory"], np.float32))
            patches += int(s.meta["patches"])
            images += int(s.meta["images"])
            self.devices[str(who)] = {
                "images": int(s.meta["images"]),
                "patches": int(s.meta["patches"]),
                "bank": len(s.arrays["memory"]),
                "completed": True,
            }
        self.state.update(union=np.concatenate(mems), patches=patches, images=images)

    # ---------------------------------------------------------------- result
    def result(self) -> FleetResult:
        """The merged head (an edgetl head object) and its provenance."""

        if len(self.steps_done) != self.n_steps:
            raise FleetError(f"the round stopped after {len(self.steps_done)} of {self.n_steps} steps")
        st = self.state
        prov = {
            "kind": self.kind,
            "steps": list(self._names),
            "devices": self.devices,
            "refused": [r.__dict__ for r in self.refused],
            **({"label_agreement": self.state["agreement"]} if self.state.get("agreement") else {}),
        }
        if self.kind in ANOMALY_KINDS:
            return self._anomaly_result(prov)
        labels = st["labels"]
        counts = st["counts"]
        prov["class_counts"] = {l: int(c) for l, c in zip(labels, counts.tolist())}
        prov["rows"] = int(st["n"])
        meta = {
            "kind": None,
            "n_features": st["d"],
            "n_classes": len(labels),
            "n_train": int(st["n"]),
            "class_counts": counts.tolist(),
            "absent_classes": [l for l, c in zip(labels, counts) if c == 0],
            "fleet": {"kind": self.kind},
        }
        if self.kind == "ridge":
            T = float(st["temperature"])
            arrays = _ridge.linear_arrays(st["fit"], T)
            meta.update(
                kind="linear",
                l2=st["fit"]["l2"],
                ridge_l2=st["fit"]["l2"],
                temperature=T,
                config={"kind": "linear", "l2": st["fit"]["l2"]},
            )
            meta["fleet"].update(l2_method="gcv" if self.l2 is None else "fixed", temperature=T)
            prov.update(l2=st["fit"]["l2"], temperature=T)
            return FleetResult("ridge", et.head_from_arrays("linear", labels, arrays, meta), prov)
        if self.kind == "prototype":
            sums = st["unit_sums"]
            norms = np.linalg.norm(sums, axis=1)
            present = norms > PROTO_NORM_EPS
            protos = np.zeros_like(sums)
            protos[present] = sums[present] / norms[present, None]
            T = float(st["temperature"])
            b = np.zeros(len(labels), np.float32)
            b[~present] = -(T + ABSENT_MARGIN)
            arrays = {
                "mean": st["mean32"],
                "prototypes": protos.T.astype(np.float32),
                "logit_scale": np.array(T, np.float32),
                "b": b,
            }
            meta.update(kind="prototype", l2=None, logit_scale=T, config={"kind": "prototype"})
            prov.update(temperature=T)
            return FleetResult("prototype", et.head_from_arrays("prototype", labels, arrays, meta), prov)
        p = st["params"]
        arrays = {"mean": st["mean32"], "scale": st["scale32"], **{n: v.astype(np.float32) for n, v in p.items()}}
        meta.update(
            kind=self.kind,
            l2=st["l2"],
            config={"kind": self.kind, "l2": st["l2"], **({"hidden": self.hidden} if self.kind == "mlp" else {})},
        )
        prov.update(rounds=self.rounds, local_steps=self.local_steps, server_lr=self.server_lr, l2=st["l2"])
        return FleetResult(self.kind, et.head_from_arrays(self.kind, labels, arrays, meta), prov)

    def _anomaly_result(self, prov: dict) -> FleetResult:

        st, tpl = self.state, self.template
        if self.kind == "padim":
            mean, m2, n = st["moments"]
            arrays = {
                "channels": np.asarray(tpl.arrays["channels"]),
                "mean": mean.astype(np.float32),
                "m2": m2.astype(np.float32),
                "count": np.asarray(n, np.int64),
            }
            prov["images"] = int(n)
            return FleetResult("padim", et.anomaly_head_like(tpl, arrays, {"images": int(n), "fleet": True}), prov)
        union = st["union"]
        target = et.coreset_size(st["patches"], tpl.config)
        if len(union) > target:
            union = union[et.greedy_coreset(union, target, seed=tpl.config.seed, projection=tpl.config.projection)]
        prov.update(images=st["images"], patches=st["patches"], union=len(st["union"]), bank=len(union))
        meta = {"images": st["images"], "patches_seen": st["patches"], "fleet": True}
        return FleetResult("patchcore", et.anomaly_head_like(tpl, {"memory": union}, meta), prov)


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
