"""The fleet's merges, one class each, registered with edgetl's head-kind registry.

A merge says which steps a round has, what the server broadcasts at each, what a device answers,
how the server checks and folds the answers, and which head comes out (the protocol is
:class:`edgetl.heads.registry.FleetMerge`). :class:`edgetl.fleet.merger.Merger` and
:func:`edgetl.fleet.summaries.respond` look a merge up by name and call it; they do not know any
kind. The arithmetic each merge uses is in :mod:`edgetl.fleet.summaries` (device side and checks)
and :mod:`edgetl.fleet.ridge`.
"""

from __future__ import annotations

import math

import numpy as np

from . import _edgetl as et
from . import ridge as _ridge
from ._edgetl import FleetError, FleetMerge, register_fleet_merge, softmax
from .summaries import (
    ABSENT_MARGIN,
    MAX_ROWS,
    PROTO_NORM_EPS,
    PROTO_T_BOUNDS,
    PROTO_T_DEFAULT,
    TEMPERATURE_POINTS,
    Step,
    Summary,
    _arr,
    _count,
    _fail,
    check_anomaly_images,
    check_classify,
    local_fedavg,
    proto_loo,
    respond_classify,
    ridge_rows,
)

__all__ = ["Ridge", "Prototype", "Linear", "MLP", "PaDiM", "PatchCore"]


# ============================================================================ classification merges
class _Classify(FleetMerge):
    """What the classification merges share: a first ``moments`` step (per-class counts and sums,
    and sums of squares or the Gram matrix), then the merge's own steps."""

    anomaly = False
    gram = False  # the moments step sends the Gram matrix (the exact ridge solve needs it)
    default_temperature = 1.0

    # ---- server: broadcast
    def fleet_steps(self, m) -> list[str]:
        raise NotImplementedError

    def fleet_broadcast(self, m, name: str, index: int) -> tuple[dict, dict]:
        st = m.state
        if name == "moments":
            cfg: dict = {"gram": self.gram}
            if not m.allow_new and m.base_labels:
                cfg["labels"] = m.base_labels
            return cfg, {}
        if name == "unit-sums":
            return {"labels": st["labels"]}, {"mean": st["mean32"]}
        if name.startswith("temperature"):
            grid = st["grid_a"] if name == "temperature-a" else st["grid_b"]
            cfg = {"labels": st["labels"], "grid": [float(v) for v in grid]}
            return self._temperature_broadcast(st, cfg)
        if name == "fedavg":
            cfg = {"labels": st["labels"], "local_steps": m.local_steps, "lr": m.lr, "l2": st["l2"]}
            arrays = {
                "mean": st["mean32"],
                "scale": st["scale32"],
                "class_weight": st["class_weight"],
                **{n: v.astype(np.float32) for n, v in st["params"].items()},
            }
            return cfg, arrays
        raise FleetError(f"a {self.name} round has no step {name!r}")

    def _temperature_broadcast(self, st: dict, cfg: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    # ---- device
    def fleet_respond(self, step: Step, data, template) -> Summary:
        return respond_classify(step, data, self)

    def temperature_rows(self, step: Step, X, y):
        """(leave-one-out logits, target column, row weights) of this device's rows."""
        raise NotImplementedError

    # ---- server: checks and merge
    def fleet_expected_arrays(self, step: Step) -> set | None:
        if step.name == "moments":
            return {"count", "sum", "gram" if step.config.get("gram") else "sumsq"}
        if step.name == "unit-sums":
            return {"count", "sum"}
        if step.name.startswith("temperature"):
            return {"slope", "curv"}
        if step.name == "fedavg":
            return {n for n in step.arrays if n not in ("mean", "scale", "class_weight")}
        return None

    def fleet_check(self, s: Summary, step: Step, who: str, ctx: dict) -> Summary:
        return check_classify(s, step, who, d=ctx.get("d"), labels=ctx.get("labels"), max_rows=ctx["max_rows"])

    def fleet_geometry(self, template) -> dict:
        return {}

    def fleet_absorb(self, m, step: Step, ok: dict) -> None:
        if step.name == "moments":
            self._absorb_moments(m, step, ok)
        elif step.name == "unit-sums":
            self._absorb_unit_sums(m, ok)
        elif step.name.startswith("temperature"):
            self._absorb_temperature(m, step, ok)
        elif step.name == "fedavg":
            self._absorb_fedavg(m, ok)
        else:
            raise FleetError(f"a {self.name} round has no step {step.name!r}")

    def _absorb_moments(self, m, step: Step, ok: dict) -> None:
        widths = {who: s.arrays["sum"].shape[1] for who, s in ok.items()}
        d = max(set(widths.values()), key=list(widths.values()).count)
        for who in [w for w, v in widths.items() if v != d]:  # the minority width is refused
            m.refuse(who, step.name, f"{who}: summary refused: {widths[who]} features, the round has {d}")
            del ok[who]
        if len(ok) < m.min_devices:
            raise FleetError(f"step moments: {len(ok)} devices agree on the feature width, {m.min_devices} needed")
        from .merger import label_agreement  # its cut is the merger's setting

        second_name = "gram" if self.gram else "sumsq"
        agreement, outliers = label_agreement(ok, second_name)
        m.state["agreement"] = agreement
        for who, reason in outliers.items():
            m.refuse(who, step.name, reason)
            del ok[who]
        if len(ok) < m.min_devices:
            raise FleetError(
                f"step moments: {len(ok)} devices left after the label check, {m.min_devices} needed "
                f"(refused: {next(iter(outliers.values()))})"
            )
        new = sorted({l for s in ok.values() for l in s.meta["labels"]} - set(m.base_labels))
        labels = m.base_labels + new
        pos = {l: i for i, l in enumerate(labels)}
        k = len(labels)
        n = 0
        counts = np.zeros(k, np.int64)
        sums = np.zeros((k, d))
        second = np.zeros((d, d)) if self.gram else np.zeros(d)
        for who, s in sorted(ok.items()):
            idx = np.array([pos[l] for l in s.meta["labels"]], np.int64)
            c = np.asarray(s.arrays["count"], np.int64)
            counts[idx] += c
            sums[idx] += np.asarray(s.arrays["sum"], np.float64)
            second += np.asarray(s.arrays[second_name], np.float64)
            n += int(s.meta["n"])
            m.devices[str(who)] = {
                "rows": int(s.meta["n"]),
                "completed": True,
                "class_counts": {l: int(v) for l, v in zip(s.meta["labels"], c.tolist())},
            }
        if np.count_nonzero(counts) < 2:
            raise FleetError(f"the devices' data covers {np.count_nonzero(counts)} class; a classifier needs 2")
        st = m.state
        st.update(d=d, labels=labels, n=n, counts=counts, class_sums=sums)
        present = counts > 0
        cw = np.zeros(k)
        cw[present] = n / (present.sum() * counts[present])  # edgetl's balanced class weights
        st["class_weight"] = cw
        self._after_moments(m, n, sums, second, counts)

    def _after_moments(self, m, n: int, sums, second, counts) -> None:
        mean64, mean32, scale32 = _ridge.standardisation(n, sums.sum(axis=0), second)
        m.state.update(mean64=mean64, mean32=mean32, scale32=scale32)

    def _absorb_unit_sums(self, m, ok: dict) -> None:
        st = m.state
        sums = np.zeros((len(st["labels"]), st["d"]))
        for s in ok.values():
            sums += np.asarray(s.arrays["sum"], np.float64)
        st["unit_sums"] = sums
        st["grid_a"] = _ridge.temperature_grid(*PROTO_T_BOUNDS, TEMPERATURE_POINTS)

    def _absorb_temperature(self, m, step: Step, ok: dict) -> None:
        st = m.state
        grid = st["grid_a"] if step.name == "temperature-a" else st["grid_b"]
        slope = sum(np.asarray(s.arrays["slope"], np.float64) for s in ok.values())
        curv = sum(np.asarray(s.arrays["curv"], np.float64) for s in ok.values())
        rows = sum(int(s.meta["rows"]) for s in ok.values())
        cols = int(np.count_nonzero(st["counts"] > 0))
        if rows == 0 or cols < 2:
            st["temperature"] = self.default_temperature
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

    def _absorb_fedavg(self, m, ok: dict) -> None:
        st = m.state
        total = sum(float(s.meta["weight"]) for s in ok.values())
        st["t"] += 1
        t, b1, b2, eps = st["t"], 0.9, 0.999, 1e-8
        for name, cur in st["params"].items():
            avg = sum(np.asarray(s.arrays[name], np.float64) * (float(s.meta["weight"]) / total) for s in ok.values())
            delta = cur - avg  # the pseudo-gradient of FedAvg (= lr * gradient when local_steps = 1)
            mo, v = st["adam"][name]
            mo = b1 * mo + (1 - b1) * delta
            v = b2 * v + (1 - b2) * delta * delta
            st["adam"][name] = (mo, v)
            st["params"][name] = cur - m.server_lr * (mo / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)

    # ---- server: result
    def fleet_result(self, m, prov: dict):
        st = m.state
        labels, counts = st["labels"], st["counts"]
        prov["class_counts"] = {l: int(c) for l, c in zip(labels, counts.tolist())}
        prov["rows"] = int(st["n"])
        meta = {
            "kind": None,
            "n_features": st["d"],
            "n_classes": len(labels),
            "n_train": int(st["n"]),
            "class_counts": counts.tolist(),
            "absent_classes": [l for l, c in zip(labels, counts) if c == 0],
            "fleet": {"kind": self.name},
        }
        arrays = self._arrays(m, meta, prov)
        return et.head_from_arrays(self.head_kind, labels, arrays, meta)

    def _arrays(self, m, meta: dict, prov: dict) -> dict:
        raise NotImplementedError


@register_fleet_merge
class Ridge(_Classify):
    """A linear head solved exactly from the merged moments (GCV penalty), then a temperature."""

    name = "ridge"
    head_kind = "linear"
    gram = True

    def fleet_steps(self, m):
        return ["moments", "temperature-a", "temperature-b"]

    def _after_moments(self, m, n, sums, second, counts):
        m.state["fit"] = _ridge.ridge_from_moments(n, sums.sum(axis=0), second, counts, sums, l2=m.l2)
        m.state["grid_a"] = _ridge.temperature_grid(*_ridge.RIDGE_T_BOUNDS, TEMPERATURE_POINTS)

    def _temperature_broadcast(self, st, cfg):
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
        return {**cfg, "n": int(f["n"])}, arrays

    def temperature_rows(self, step, X, y):
        return ridge_rows(step, X, y)

    def _arrays(self, m, meta, prov):
        st = m.state
        T = float(st["temperature"])
        l2 = st["fit"]["l2"]
        meta.update(kind="linear", l2=l2, ridge_l2=l2, temperature=T, config={"kind": "linear", "l2": l2})
        meta["fleet"].update(l2_method="gcv" if m.l2 is None else "fixed", temperature=T)
        prov.update(l2=l2, temperature=T)
        return _ridge.linear_arrays(st["fit"], T)


@register_fleet_merge
class Prototype(_Classify):
    """edgetl's prototype head on the union, exactly: shared mean, unit sums, leave-one-out temperature."""

    name = "prototype"
    head_kind = "prototype"
    default_temperature = PROTO_T_DEFAULT

    def fleet_steps(self, m):
        return ["moments", "unit-sums", "temperature-a", "temperature-b"]

    def _temperature_broadcast(self, st, cfg):
        return cfg, {"mean": st["mean32"], "sums": st["unit_sums"].T.copy(), "class_weight": st["class_weight"]}

    def temperature_rows(self, step, X, y):
        return proto_loo(step, X, y)

    def _arrays(self, m, meta, prov):
        st = m.state
        sums = st["unit_sums"]
        norms = np.linalg.norm(sums, axis=1)
        present = norms > PROTO_NORM_EPS
        protos = np.zeros_like(sums)
        protos[present] = sums[present] / norms[present, None]
        T = float(st["temperature"])
        b = np.zeros(len(st["labels"]), np.float32)
        b[~present] = -(T + ABSENT_MARGIN)
        meta.update(kind="prototype", l2=None, logit_scale=T, config={"kind": "prototype"})
        prov.update(temperature=T)
        return {
            "mean": st["mean32"],
            "prototypes": protos.T.astype(np.float32),
            "logit_scale": np.array(T, np.float32),
            "b": b,
        }


class _FedAvg(_Classify):
    """``moments``, then R rounds of FedAvg with a server Adam (FedAdam)."""

    def fleet_steps(self, m):
        if not 1 <= m.rounds <= 10_000:
            raise FleetError(f"rounds must be 1..10000, got {m.rounds}")
        return ["moments"] + ["fedavg"] * m.rounds

    def _after_moments(self, m, n, sums, second, counts):
        super()._after_moments(m, n, sums, second, counts)
        st = m.state
        st["l2"] = 1e-2 if m.l2 is None else float(m.l2)
        st["params"] = self.start_params(m, st["mean64"], st["scale32"], sums, counts)
        st["adam"] = {nm: (np.zeros_like(v), np.zeros_like(v)) for nm, v in st["params"].items()}
        st["t"] = 0

    def start_params(self, m, mean64, scale32, sums, counts) -> dict:
        raise NotImplementedError

    def grads(self, p: dict, Xs, Y, w, l2) -> dict:
        """Gradients of ``sum_i w_i CE_i + l2/2 ||weights||^2`` (w sums to 1 on this device)."""
        raise NotImplementedError

    def local_update(self, step, X, y, labels) -> Summary:
        return local_fedavg(step, X, y, labels, self.grads)

    def config(self, m, st) -> dict:
        return {"kind": self.head_kind, "l2": st["l2"]}

    def _arrays(self, m, meta, prov):
        st = m.state
        meta.update(kind=self.head_kind, l2=st["l2"], config=self.config(m, st))
        prov.update(rounds=m.rounds, local_steps=m.local_steps, server_lr=m.server_lr, l2=st["l2"])
        return {
            "mean": st["mean32"],
            "scale": st["scale32"],
            **{n: v.astype(np.float32) for n, v in st["params"].items()},
        }


@register_fleet_merge
class Linear(_FedAvg):
    """FedNCM start (class means on the shared standardisation), then FedAdam; E = 1 is exact
    distributed Adam."""

    name = "linear"
    head_kind = "linear"

    def start_params(self, m, mean64, scale32, sums, counts):
        d, k = len(mean64), len(counts)
        present = counts > 0
        # FedNCM: class means on the shared standardisation as the weights, cosine-scaled
        means = np.zeros((k, d))
        means[present] = (sums[present] / counts[present, None] - mean64) / scale32.astype(np.float64)
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        W = np.where(norms > 0, means / np.maximum(norms, 1e-12), 0.0).T * (10.0 / math.sqrt(d))
        b = np.where(present, 0.0, -ABSENT_MARGIN)
        return {"W": W, "b": b}

    def grads(self, p, Xs, Y, w, l2):
        P = softmax(Xs @ p["W"] + p["b"])
        G = (P - Y) * w[:, None]
        return {"W": Xs.T @ G + l2 * p["W"], "b": G.sum(axis=0)}


@register_fleet_merge
class MLP(_FedAvg):
    """As linear from a seeded start (no exact merge)."""

    name = "mlp"
    head_kind = "mlp"

    def start_params(self, m, mean64, scale32, sums, counts):
        d, k = len(mean64), len(counts)
        present = counts > 0
        rng = np.random.default_rng(m.seed)
        W1 = rng.standard_normal((d, m.hidden)) * math.sqrt(2.0 / d)
        W2 = rng.standard_normal((m.hidden, k)) * math.sqrt(1.0 / m.hidden)
        return {"W1": W1, "b1": np.zeros(m.hidden), "W2": W2, "b2": np.where(present, 0.0, -ABSENT_MARGIN)}

    def grads(self, p, Xs, Y, w, l2):
        H = Xs @ p["W1"] + p["b1"]
        R = np.maximum(H, 0)
        P = softmax(R @ p["W2"] + p["b2"])
        G = (P - Y) * w[:, None]
        dR = (G @ p["W2"].T) * (H > 0)
        return {
            "W2": R.T @ G + l2 * p["W2"],
            "b2": G.sum(axis=0),
            "W1": Xs.T @ dR + l2 * p["W1"],
            "b1": dR.sum(axis=0),
        }

    def config(self, m, st):
        return {**super().config(m, st), "hidden": m.hidden}


# ============================================================================ anomaly merges
class _Anomaly(FleetMerge):
    """One step named after the kind; devices answer from their own anomaly head and patch features."""

    anomaly = True

    def fleet_steps(self, m):
        return [self.name]

    def fleet_broadcast(self, m, name, index):
        return {}, {}

    def fleet_expected_arrays(self, step):
        raise NotImplementedError

    def fleet_respond(self, step: Step, data, template) -> Summary:
        if template is None:
            raise FleetError("an anomaly summary needs the device's own anomaly head")
        F = data.F
        if step.kind != template.kind:
            raise FleetError(f"the round merges {step.kind} heads; this device runs {template.kind}")
        if tuple(F.shape[1:]) != (template.channels_in, *template.grid):
            raise FleetError(f"patch features {F.shape[1:]} do not fit this bundle's head")
        s = self._respond(step, F, template)
        if "tiles" in template.meta:  # rows are tiles of frames cut by this plan
            s.meta["tiles"] = str(template.meta["tiles"])
        return s

    def _respond(self, step, F, template) -> Summary:
        raise NotImplementedError

    def fleet_check(self, s, step, who, ctx):
        want, got = ctx.get("tiles"), s.meta.get("tiles", "none")
        if want is not None and got != want:
            # patches of another tiling are another scale of the part: merged, the bank would fit
            # neither plan's frames
            _fail(
                who,
                f"its bundle tiles frames as {got}, this round's bundle as {want} (fitted on frames of "
                "another size or another --defect-size): not merged; give the device a copy of this "
                "round's bundle",
            )
        images = check_anomaly_images(s, who, ctx["max_rows"])
        return self._check(s, who, images, ctx)

    def _check(self, s, who, images, ctx) -> Summary:
        raise NotImplementedError

    def own_summary(self, head) -> Summary:
        """The server bundle's own head statistics as a participant's answer."""
        raise NotImplementedError

    def gate_arrays(self, current, arrays: dict) -> None:
        """Refuse (FleetError) a merged head's arrays that do not fit the device's current head."""
        raise NotImplementedError


@register_fleet_merge
class PaDiM(_Anomaly):
    """Exact: per-position moments merged by Chan's parallel formula."""

    name = "padim"
    head_kind = "padim"

    def fleet_broadcast(self, m, name, index):
        return {}, {"channels": np.asarray(m.template.arrays["channels"], np.int64)}

    def fleet_expected_arrays(self, step):
        return {"mean", "m2_triu"}

    def fleet_geometry(self, t) -> dict:
        return {"P": int(t.grid[0] * t.grid[1]), "dims": len(t.arrays["channels"])}

    def _respond(self, step, F, template):
        channels = np.asarray(template.arrays["channels"], np.int64)
        sent = step.arrays.get("channels")
        if sent is None or not np.array_equal(np.asarray(sent, np.int64), channels):
            raise FleetError("the server's PaDiM channels differ from this bundle's (another release?)")
        mean, m2, n = et.padim_moments(F, channels)
        iu = np.triu_indices(len(channels))
        return Summary(self.name, self.name, {"mean": mean, "m2_triu": m2[:, iu[0], iu[1]]}, {"images": int(n)})

    def _check(self, s, who, n, geo):
        P, dims = geo.get("P"), geo.get("dims")
        mean = _arr(s, "mean", who, shape=(P, dims) if P else None, ndim=2)
        dd = mean.shape[1] * (mean.shape[1] + 1) // 2
        tri = _arr(s, "m2_triu", who, shape=(mean.shape[0], dd))
        iu = np.triu_indices(mean.shape[1])
        diag = tri[:, iu[0] == iu[1]]
        if np.any(diag < -1e-6 * np.maximum(1.0, np.abs(diag).max())):
            _fail(who, "negative scatter on the diagonal")
        if n == 1 and np.abs(tri).max() > 0:
            _fail(who, "one image cannot have a non-zero scatter")
        return s

    def fleet_absorb(self, m, step, ok):
        dims = len(m.template.arrays["channels"])
        iu = np.triu_indices(dims)
        acc = None
        for who, s in sorted(ok.items()):
            tri = np.asarray(s.arrays["m2_triu"], np.float64)
            m2 = np.zeros((tri.shape[0], dims, dims))
            m2[:, iu[0], iu[1]] = tri
            m2[:, iu[1], iu[0]] = tri
            part = (np.asarray(s.arrays["mean"], np.float64), m2, int(s.meta["images"]))
            acc = part if acc is None else et.merge_moments(*acc, *part)
            m.devices[str(who)] = {"images": int(s.meta["images"]), "completed": True}
        m.state["moments"] = acc

    def fleet_result(self, m, prov):
        mean, m2, n = m.state["moments"]
        arrays = {
            "channels": np.asarray(m.template.arrays["channels"]),
            "mean": mean.astype(np.float32),
            "m2": m2.astype(np.float32),
            "count": np.asarray(n, np.int64),
        }
        prov["images"] = int(n)
        return et.anomaly_head_like(m.template, arrays, {"images": int(n), "fleet": True})

    def own_summary(self, head):
        m2 = np.asarray(head.arrays["m2"], np.float64)
        iu = np.triu_indices(m2.shape[-1])
        n = int(np.asarray(head.arrays["count"]).reshape(-1)[0])
        arrays = {"mean": np.asarray(head.arrays["mean"], np.float64), "m2_triu": m2[:, iu[0], iu[1]]}
        return Summary(self.name, self.name, arrays, {"images": n})

    def gate_arrays(self, current, arrays):
        if set(arrays) != {"channels", "mean", "m2", "count"}:
            raise FleetError(f"global {self.name} head arrays {sorted(arrays)}, expected channels, count, m2, mean")
        ref = current.arrays
        if (
            arrays["mean"].shape != ref["mean"].shape
            or arrays["m2"].shape != ref["m2"].shape
            or not np.array_equal(arrays["channels"], ref["channels"])
        ):
            raise FleetError("global PaDiM moments do not fit this bundle's head")


@register_fleet_merge
class PatchCore(_Anomaly):
    """A coreset of coresets: greedy k-centre over the union of the devices' banks."""

    name = "patchcore"
    head_kind = "patchcore"

    def fleet_expected_arrays(self, step):
        return {"memory"}

    def fleet_geometry(self, t) -> dict:
        return {"channels_in": int(t.channels_in), "max_memory": int(t.config.max_memory)}

    def _respond(self, step, F, template):
        cfg = template.config
        X = et.patch_rows(F)
        idx = et.greedy_coreset(X, et.coreset_size(len(X), cfg), seed=cfg.seed, projection=cfg.projection)
        return Summary(self.name, self.name, {"memory": X[idx]}, {"images": len(F), "patches": len(X)})

    def _check(self, s, who, n, geo):
        C, cap = geo.get("channels_in"), geo.get("max_memory", MAX_ROWS)
        mem = _arr(s, "memory", who, ndim=2)
        if C is not None and mem.shape[1] != C:
            _fail(who, f"memory bank rows have {mem.shape[1]} channels, expected {C} (another backbone?)")
        patches = _count(s.meta, "patches", who, geo["max_rows"] * 10_000)
        if not 1 <= mem.shape[0] <= min(cap, patches):
            _fail(who, f"memory bank of {mem.shape[0]} rows from {patches} patches (at most {cap})")
        return s

    def fleet_absorb(self, m, step, ok):
        mems, patches, images = [], 0, 0
        for who, s in sorted(ok.items()):
            mems.append(np.asarray(s.arrays["memory"], np.float32))
            patches += int(s.meta["patches"])
            images += int(s.meta["images"])
            m.devices[str(who)] = {
                "images": int(s.meta["images"]),
                "patches": int(s.meta["patches"]),
                "bank": len(s.arrays["memory"]),
                "completed": True,
            }
        m.state.update(union=np.concatenate(mems), patches=patches, images=images)

    def fleet_result(self, m, prov):
        st, tpl = m.state, m.template
        union = st["union"]
        target = et.coreset_size(st["patches"], tpl.config)
        if len(union) > target:
            union = union[et.greedy_coreset(union, target, seed=tpl.config.seed, projection=tpl.config.projection)]
        prov.update(images=st["images"], patches=st["patches"], union=len(st["union"]), bank=len(union))
        meta = {"images": st["images"], "patches_seen": st["patches"], "fleet": True}
        return et.anomaly_head_like(tpl, {"memory": union}, meta)

    def own_summary(self, head):
        mem = np.asarray(head.arrays["memory"], np.float32)
        meta = {
            "images": int(head.meta.get("images", 1)),
            "patches": int(max(head.meta.get("patches_seen", len(mem)), len(mem))),
        }
        return Summary(self.name, self.name, {"memory": mem}, meta)

    def gate_arrays(self, current, arrays):
        if set(arrays) != {"memory"}:
            raise FleetError(f"global {self.name} head arrays {sorted(arrays)}, expected ['memory']")
        mem = arrays["memory"]
        if mem.ndim != 2 or mem.shape[1] != current.channels_in:
            raise FleetError(f"global memory bank {mem.shape} does not fit this bundle")
