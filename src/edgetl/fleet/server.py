"""The server side of a fleet round, without any engine: steps, merge, and the new head version.

:class:`FleetRound` wraps a :class:`~edgetl.fleet.merger.Merger` for the server's bundle: it
picks the merge for the bundle's head kind (a ``linear`` bundle gets the exact ``ridge`` merge,
which produces the same ``linear`` arrays), adds what the bundle itself already knows as one more
participant (``base="current"``: its replay exemplars, or its anomaly head's moments / memory
bank; ``base="none"`` merges the devices only), and at the end writes the merged head as a new
version of the bundle through edgetl's own machinery: writer lock, ``heads/vN.npz``, fused
``model-vN.*``, one atomic manifest switch. The version entry says ``source: "fleet"`` and holds
the provenance (devices and their class counts, steps and FedAvg rounds, refusals, engine);
nothing else in the bundle changes (labels grow only by classes the devices brought; the replay
memory stays the previous version's, since no device sends features).

Flower drives a :class:`FleetRound` in :mod:`edgetl.fleet.flower`; :func:`run_round` drives it in
process, for tests and ``simulate --engine none``.
"""

from __future__ import annotations

from . import _edgetl as et
from .device import answer, base_participant
from .merger import FleetResult, Merger
from .summaries import DEFAULT_BASE, FleetError, Step

# the fleet merge for each edgetl head kind
DEFAULT_KIND = {"linear": "ridge", "prototype": "prototype", "mlp": "mlp", "padim": "padim", "patchcore": "patchcore"}
MAX_DEVICES_LISTED = 500  # provenance lists devices one by one up to this many


class FleetRound:
    """One fleet round for the bundle at ``bundle`` (see the module docstring)."""

    def __init__(
        self,
        bundle,
        *,
        kind: str | None = None,
        base: str = DEFAULT_BASE,
        min_devices: int = 1,
        allow_new_classes: bool = True,
        rounds: int = 30,
        local_steps: int = 1,
        l2: float | None = None,
        seed: int = 0,
        max_rows: int | None = None,
    ):
        b = et.load_bundle(bundle)
        self.bundle = b.path
        head = et.current_head(b)
        self.task = b.task
        self.task_obj = task = et.task_of(b.task)
        kind = kind or DEFAULT_KIND[head.kind]
        try:
            merge = et.fleet_merge(kind)
        except FleetError:
            raise FleetError(f"--kind {kind!r}: choose one of {', '.join(et.fleet_merge_names())}") from None
        if merge.anomaly != task.one_class:
            raise FleetError(f"--kind {kind} does not fit this {b.task} bundle (its head is {head.kind})")
        if merge.anomaly and merge.head_kind != head.kind:
            raise FleetError(f"this bundle's head is {head.kind}; a fleet round merges the same kind")
        if base not in ("current", "none"):
            raise FleetError(f"--base {base!r}: choose current or none")
        extra = {} if max_rows is None else {"max_rows": max_rows}
        self.merger = Merger(
            kind,
            labels=None if task.one_class else b.labels,
            allow_new_classes=allow_new_classes,
            l2=l2,
            rounds=rounds,
            local_steps=local_steps,
            seed=seed,
            anomaly_template=head if task.one_class else None,
            min_devices=min_devices,
            **extra,
        )
        self.kind = kind
        self.base = base
        self.participants = dict([base_participant(b.path)]) if base == "current" else {}
        self.result: FleetResult | None = None
        self.written: dict | None = None

    @property
    def n_steps(self) -> int:
        return self.merger.n_steps

    def step(self, i: int) -> Step:
        return self.merger.step(i)

    def absorb(self, step: Step, replies: dict) -> list:
        """Fold the devices' replies (``{id: Summary or exception}``) and the server's own base
        participant into the merge; returns this step's refusals."""
        replies = dict(replies)
        for name, p in self.participants.items():
            replies[name] = answer(p, step, template=self.merger.template)
        return self.merger.absorb(step, replies)

    def finish(self, *, write: bool = True, engine: str = "none", signer=None, wait: float = 0.0) -> dict:
        """Merge, and (``write``) make the merged head the bundle's new current version. Returns
        the round's report (provenance, and the new version when written)."""
        self.result = self.merger.result()
        prov = self._provenance(engine)
        report = {"bundle": str(self.bundle), "kind": self.kind, **prov}
        if write:
            with et.for_update(self.bundle, operation="fleet serve", wait=wait) as b:
                entry = {"source": "fleet", "fleet": prov, "images": int(prov.get("rows", prov.get("images", 0)))}
                _, version = et.write_head_version(b, self.result.head, entry=entry, signer=signer)
            report["version"] = version
        self.written = report
        return report

    def _provenance(self, engine: str) -> dict:
        p = dict(self.result.provenance)
        devices = p.pop("devices", {})
        participants = {k: v for k, v in devices.items() if k not in self.participants}
        p["devices"] = len(participants)
        p["completed"] = sum(1 for v in participants.values() if v.get("completed", True))
        if len(participants) <= MAX_DEVICES_LISTED:
            p["device_detail"] = participants
        p["base"] = self.base if not self.participants else {k: devices.get(k, {}) for k in self.participants}
        p["rounds"] = len(p.get("steps", []))
        p["engine"] = engine
        return p

    def delivery(self) -> tuple[str, list[str], dict, dict, dict]:
        """(kind, labels, head arrays, head meta, short provenance) to send to the devices."""
        if self.result is None:
            raise FleetError("the round has not finished")
        h = self.result.head
        one_class = self.task_obj.one_class
        labels = list(self.task_obj.fixed_labels) if one_class else list(h.labels)
        # a defect head's delivery names its tile plan: a device of another plan refuses it
        meta = ({"tiles": h.meta["tiles"]} if "tiles" in h.meta else {}) if one_class else dict(h.meta)
        short = {
            k: v
            for k, v in (self.written or {}).items()
            if k in ("kind", "devices", "rounds", "class_counts", "version", "engine", "bundle")
        }
        return self.kind, labels, dict(h.arrays), meta, short


def run_round(
    fleet: FleetRound,
    devices: dict,
    *,
    write: bool = True,
    deliver: bool = True,
    tolerance_pp: float = 5.0,
    signer=None,
) -> dict:
    """Run ``fleet`` in process against ``devices`` (``{name: Device}``): every step, the merge,
    the server's new version, then each device's gate on the global head. Returns the report with
    ``deliveries`` (each device's decision, or the one-line reason it refused)."""
    for i in range(fleet.n_steps):
        step = fleet.step(i)
        replies = {}
        for name, dev in devices.items():
            try:
                replies[name] = dev.respond(step)
            except et.EdgetlError as exc:
                replies[name] = exc
        fleet.absorb(step, replies)
    report = fleet.finish(write=write, engine="in-process")
    if deliver:
        import json

        kind, labels, arrays, meta, short = fleet.delivery()
        doc = json.loads(
            json.dumps(
                {"kind": kind, "labels": labels, "meta": meta, "provenance": short},
                default=lambda o: o.item() if hasattr(o, "item") else str(o),
            )
        )
        signature = et.sign_delivery(signer, doc, arrays) if signer is not None else None
        out = {}
        for name, dev in devices.items():
            try:
                out[name] = dev.consider(
                    kind,
                    labels,
                    arrays,
                    doc["meta"],
                    provenance=doc["provenance"],
                    tolerance_pp=tolerance_pp,
                    signer=signer,
                    signature=signature,
                )
            except (et.GateError, et.TrustError) as exc:
                out[name] = {"accepted": False, "device": name, "reason": str(exc), "exit_code": exc.exit_code}
        report["deliveries"] = out
    return report
