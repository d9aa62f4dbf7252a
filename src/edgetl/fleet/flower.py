"""Fleet rounds on Flower (``flwr`` >= 1.42, its Message API): the ServerApp, the ClientApp, the
strategy that drives a :class:`~edgetl.fleet.server.FleetRound`, and helpers to run them.

How one round maps onto Flower:

* Each fleet *step* (ridge: ``moments``, ``temperature-a``, ``temperature-b``; see
  :mod:`edgetl.fleet.summaries`) is one Flower training round: :class:`FleetStrategy` sends the
  step's arrays in an ``ArrayRecord`` and its numbers as JSON in a ``ConfigRecord``; each device's
  ClientApp answers with its summary (``ArrayRecord`` "summary", ``ConfigRecord`` "meta",
  ``MetricRecord`` "metrics" with ``num-examples``). The strategy checks and merges them.
* After the last step the server writes the merged head as a new version of its bundle, and the
  evaluation round of that last step *delivers* the head to the devices that took part; each
  device's gate accepts it as a new version or refuses it (:meth:`edgetl.fleet.device.Device.consider`)
  and says so in its reply. No other evaluation round runs.
* ClientApps are numpy-only (no torch): Flower's ``Array`` carries numpy arrays serialised with
  ``np.save(..., allow_pickle=False)``; the decoder here also refuses any other serialisation type
  and non-numeric dtypes before touching the bytes. Devices act only on arrays and JSON numbers.

Two ways to run it:

* deployment: ``flower-superlink`` + ``flower-supernode`` processes and ``flwr run`` of a tiny app
  folder whose components are ``edgetl.fleet.flower:server_app`` / ``:client_app``
  (:mod:`edgetl.fleet.deploy`); ``edgetl fleet serve`` / ``join`` do this;
* simulation: :func:`simulate` (``flwr.simulation.run_simulation``; needs the Ray backend, the
  ``fleet-sim`` extra), the ServerApp in this process and one virtual SuperNode per device.

``FLWR_TELEMETRY_ENABLED`` is set to ``0`` here unless the caller set it: Flower's telemetry is on
by default and edge fleets often have no route to the internet.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np

from ..core.console import clip
from . import _edgetl as et
from .device import DEFAULT_TOLERANCE_PP, HOLDOUT, Device
from .server import FleetRound
from .summaries import DEFAULT_BASE, FleetError, Summary, step_from_wire, step_to_wire


def _flwr():
    try:
        import flwr
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import Strategy
    except ImportError as exc:
        raise et.MissingDependency(
            f"fleet rounds need Flower ({exc}); install it with: pip install 'edgetl[fleet]'"
        ) from None
    return {
        "Array": Array,
        "ArrayRecord": ArrayRecord,
        "ConfigRecord": ConfigRecord,
        "Message": Message,
        "MessageType": MessageType,
        "MetricRecord": MetricRecord,
        "RecordDict": RecordDict,
        "ClientApp": ClientApp,
        "ServerApp": ServerApp,
        "Grid": Grid,
        "Strategy": Strategy,
        "version": flwr.__version__,
    }


F = _flwr()
Array, ArrayRecord, ConfigRecord = F["Array"], F["ArrayRecord"], F["ConfigRecord"]
Message, MessageType, MetricRecord, RecordDict = F["Message"], F["MessageType"], F["MetricRecord"], F["RecordDict"]
ENGINE = f"flower {F['version']}"
MAX_ARRAY_BYTES = 1 << 30  # one array in one message


# ============================================================================================ wire
def to_array_record(arrays: dict):
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record, *, who: str = "peer") -> dict:
    """Numeric numpy arrays from an ``ArrayRecord``; anything but ``np.save`` bytes of a numeric
    dtype is refused before it is decoded."""
    out = {}
    for name in list(record.keys()):
        a = record[name]
        if getattr(a, "stype", None) != "numpy.ndarray":
            raise FleetError(
                f"{who}: array {name!r} has serialisation {getattr(a, 'stype', None)!r}; only numpy arrays are accepted"
            )
        if len(a.data) > MAX_ARRAY_BYTES:
            raise FleetError(f"{who}: array {name!r} is larger than {MAX_ARRAY_BYTES} bytes")
        try:
            dt = np.dtype(a.dtype)
        except TypeError:
            raise FleetError(f"{who}: array {name!r} has dtype {a.dtype!r}") from None
        if dt.kind not in "iuf":
            raise FleetError(f"{who}: array {name!r} has dtype {a.dtype}; only numbers are accepted")
        try:
            v = a.numpy()  # np.load(..., allow_pickle=False)
        except Exception as exc:
            raise FleetError(f"{who}: array {name!r} cannot be decoded ({type(exc).__name__})") from None
        if v.dtype.kind not in "iuf":
            raise FleetError(f"{who}: array {name!r} decodes to dtype {v.dtype}")
        out[name] = v
    return out


def _json_of(content, key: str, *, who: str) -> str:
    rec = content.get(key) if hasattr(content, "get") else None
    if rec is None or "json" not in rec:
        raise FleetError(f"{who}: reply without its {key!r} record")
    value = rec["json"]
    if not isinstance(value, str):
        raise FleetError(f"{who}: {key!r} record is not JSON text")
    return value


# ============================================================================================ strategy
class FleetStrategy(F["Strategy"]):
    """A Flower strategy whose rounds are the steps of a :class:`FleetRound` (see the module
    docstring). ``min_devices`` SuperNodes must be connected within ``wait`` seconds."""

    def __init__(
        self,
        fleet: FleetRound,
        *,
        min_devices: int = 2,
        wait: float = 120.0,
        write: bool = True,
        signer=None,
        lock_wait: float = 0.0,
    ):
        self.fleet = fleet
        self.min_devices = int(min_devices)
        self.wait = float(wait)
        self.write = write
        self.signer = signer
        self.lock_wait = lock_wait
        self.nodes: list[int] = []
        self.names: dict[int, str] = {}
        self.report: dict | None = None
        self.deliveries: dict[str, dict] = {}
        self.step_log: list[dict] = []

    def summary(self) -> None:  # Flower logs this at start
        from logging import INFO

        from flwr.supercore import log

        log(
            INFO,
            "\tedgetl fleet round: %s merge, %d steps, at least %d devices",
            self.fleet.kind,
            self.fleet.n_steps,
            self.min_devices,
        )

    def _wait_for_nodes(self, grid) -> list[int]:
        deadline = time.monotonic() + self.wait
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.min_devices:
                return nodes
            if time.monotonic() > deadline:
                raise FleetError(
                    f"{len(nodes)} devices connected within {self.wait:g} s; the round needs "
                    f"{self.min_devices} (--devices)"
                )
            time.sleep(0.5)

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 1:
            self.nodes = self._wait_for_nodes(grid)
        step = self.fleet.step(server_round - 1)
        arrs, meta = step_to_wire(step)
        out = []
        for node in self.nodes:
            content = RecordDict({"arrays": to_array_record(arrs), "config": ConfigRecord({"json": meta})})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self._step = step
        return out

    def aggregate_train(self, server_round, replies):
        step = self._step
        summaries = {}
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            who = self.names.get(node, f"node-{node}")
            answered.add(node)
            if msg.has_error():
                summaries[who] = FleetError(f"{who}: failed ({msg.error.reason})")
                continue
            try:
                c = msg.content
                meta = json.loads(_json_of(c, "meta", who=who)) if "meta" in c else {}
                if isinstance(meta, dict) and meta.get("error"):
                    raise FleetError(f"{who}: {clip(meta['error'], 500)}")
                arrays = from_array_record(c["summary"], who=who) if "summary" in c else {}
                s = Summary.from_wire(arrays, _json_of(c, "meta", who=who), who=who)
                name = s.meta.pop("device", None)
                if server_round == 1 and isinstance(name, str) and 0 < len(name) <= 100:
                    who = self.names.setdefault(node, f"{name} (node {node})")
                summaries[who] = s
            except FleetError as exc:
                summaries[who] = exc
        for node in self.nodes:
            if node not in answered:
                who = self.names.get(node, f"node-{node}")
                summaries[who] = FleetError(f"{who}: no reply within the round's timeout")
        refusals = self.fleet.absorb(step, summaries)
        good = {n for n in self.nodes if self.names.get(n, f"node-{n}") not in {r.device for r in refusals}}
        self.nodes = sorted(good)
        self.step_log.append({"step": step.name, "replies": len(summaries), "refused": len(refusals)})
        metrics = MetricRecord({"devices": len(self.nodes), "refused": len(refusals)})
        if server_round == self.fleet.n_steps:
            self.report = self.fleet.finish(write=self.write, engine=ENGINE, signer=self.signer, wait=self.lock_wait)
            self.report["step_log"] = self.step_log
            _, _, head_arrays, _, _ = self.fleet.delivery()
            return to_array_record(head_arrays), metrics
        return None, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        if server_round != self.fleet.n_steps or self.report is None:
            return []
        kind, labels, head_arrays, meta, short = self.fleet.delivery()
        # JSON-normalised first, so the signed statement is what a device decodes
        doc = json.loads(
            json.dumps({"kind": kind, "labels": labels, "meta": meta, "provenance": short}, default=_jsonable)
        )
        if self.signer is not None:
            doc["signature"] = et.sign_delivery(self.signer, doc, head_arrays)
        head = json.dumps(doc)
        out = []
        for node in self.nodes:
            content = RecordDict({"arrays": to_array_record(head_arrays), "config": ConfigRecord({"json": head})})
            out.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        return out

    def aggregate_evaluate(self, server_round, replies):
        accepted = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            who = self.names.get(node, f"node-{node}")
            if msg.has_error():
                self.deliveries[who] = {"accepted": False, "reason": f"failed ({msg.error.reason})"}
                continue
            try:
                d = json.loads(_json_of(msg.content, "meta", who=who))
            except (FleetError, ValueError) as exc:
                d = {"accepted": False, "reason": str(exc)}
            self.deliveries[who] = d if isinstance(d, dict) else {"accepted": False, "reason": "unreadable reply"}
            accepted += bool(self.deliveries[who].get("accepted"))
        if self.report is not None:
            self.report["deliveries"] = self.deliveries
            self.report["accepted"] = accepted
        return MetricRecord({"accepted": accepted, "delivered": len(self.deliveries)})


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ============================================================================================ server app
def run_server(
    grid,
    *,
    bundle,
    kind=None,
    base=DEFAULT_BASE,
    min_devices=2,
    wait=120.0,
    timeout=600.0,
    rounds=30,
    l2=None,
    allow_new_classes=True,
    signer=None,
    write=True,
    lock_wait=0.0,
) -> dict:
    """Run one fleet round on ``grid`` (inside a ServerApp); returns the report."""
    fleet = FleetRound(
        bundle, kind=kind, base=base, min_devices=min_devices, rounds=rounds, l2=l2, allow_new_classes=allow_new_classes
    )
    strategy = FleetStrategy(fleet, min_devices=min_devices, wait=wait, write=write, signer=signer, lock_wait=lock_wait)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=fleet.n_steps, timeout=timeout)
    if strategy.report is None:
        raise FleetError("the fleet round ended without a merged head")
    return strategy.report


server_app = F["ServerApp"]()


@server_app.main()
def _server_main(grid, context) -> None:
    """Deployment ServerApp: everything comes from the run config (see :func:`edgetl.fleet.deploy.write_app_dir`)."""
    rc = dict(context.run_config)
    report_path = str(rc.get("report", "") or "")
    try:
        l2 = float(rc.get("l2", -1.0))
        report = run_server(
            grid,
            bundle=str(rc["bundle"]),
            kind=str(rc.get("kind", "")) or None,
            base=str(rc.get("base", "current")),
            min_devices=int(rc.get("min-devices", 2)),
            wait=float(rc.get("wait", 120)),
            timeout=float(rc.get("timeout", 600)),
            rounds=int(rc.get("rounds", 30)),
            l2=None if l2 < 0 else l2,
            allow_new_classes=bool(rc.get("allow-new-classes", True)),
            signer=et.signing_key(str(rc.get("sign-key", "")) or None),
            lock_wait=float(rc.get("lock-wait", 0)),
        )
    except et.EdgetlError as exc:
        report = {"error": str(exc), "exit_code": getattr(exc, "exit_code", 2)}
    if report_path:
        Path(report_path).write_text(json.dumps(report, default=_jsonable, indent=1))


# ============================================================================================ client app
def _device_from_state(context, spec: dict) -> Device:
    """The device's extracted features live in the node's ``context.state`` for the whole run, so
    the backbone runs once per round, not once per step."""
    st = context.state
    if "fleet-device" in st:
        info = json.loads(st["fleet-device"]["json"])
        arrs = from_array_record(st["fleet-data"], who="state")
        if et.task_of(info["task"]).one_class:
            b = et.load_bundle(info["bundle"])
            dev = Device.from_features(
                info["bundle"],
                patches=np.concatenate([arrs["train"], arrs["held"]]),
                name=info["name"],
                holdout=0.0,
                template=et.current_head(b),
                task=info["task"],
                rows_per_image=et.tiles_per_image(b),
            )
            dev.train.F, dev.heldout.F = arrs["train"], arrs["held"]
            k = et.tiles_per_image(b)  # the summarised frames lack their overview row
            dev.images = len(arrs["held"]) // k + len(arrs["train"]) // max(1, k - int(et.has_overview(b)))
            return dev
        dev = Device.from_features(
            info["bundle"], X=arrs["train"], labels=info["train"], name=info["name"], holdout=0.0, task=info["task"]
        )
        dev.heldout.X, dev.heldout.labels = arrs["held"], info["held"]
        dev.images = info["images"]
        return dev
    dev = Device.open(
        spec["bundle"],
        spec["data"],
        name=spec.get("name") or None,
        holdout=float(spec.get("holdout", HOLDOUT)),
        seed=int(spec.get("seed", 0)),
    )
    if et.task_of(dev.task).one_class:
        arrays = {"train": dev.train.F, "held": dev.heldout.F if dev.heldout.F is not None else dev.train.F[:0]}
        info = {"task": dev.task}
    else:
        d = dev.train.X.shape[1]
        arrays = {"train": dev.train.X, "held": dev.heldout.X.reshape(-1, d)}
        info = {"task": dev.task, "train": dev.train.labels, "held": dev.heldout.labels or []}
    info.update(bundle=str(dev.bundle), name=dev.name, images=dev.images)
    st["fleet-data"] = to_array_record(arrays)
    st["fleet-device"] = ConfigRecord({"json": json.dumps(info)})
    return dev


def _reply(msg, arrays: dict, meta_json: str, n: int):
    content = RecordDict(
        {
            "summary": to_array_record(arrays),
            "meta": ConfigRecord({"json": meta_json}),
            "metrics": MetricRecord({"num-examples": int(n)}),
        }
    )
    return Message(content=content, reply_to=msg)


def client_train(msg, context, spec: dict):
    """A device's answer to one step (errors travel back as one line, never as a traceback)."""
    try:
        dev = _device_from_state(context, spec)
        c = msg.content
        step = step_from_wire(from_array_record(c["arrays"], who="server"), _json_of(c, "config", who="server"))
        s = dev.respond(step)
        s.meta["device"] = dev.name
        arrays, meta = s.to_wire()
        return _reply(msg, arrays, meta, dev.images)
    except et.EdgetlError as exc:
        return _reply(msg, {}, json.dumps({"error": str(exc)}), 0)


def client_deliver(msg, context, spec: dict):
    """The device's gate on the delivered global head."""
    decision: dict
    try:
        dev = _device_from_state(context, spec)
        c = msg.content
        head = json.loads(_json_of(c, "config", who="server"))
        if not isinstance(head, dict) or not isinstance(head.get("labels"), list):
            raise FleetError("server delivered a head without labels")
        arrays = from_array_record(c["arrays"], who="server")
        signer = et.signing_key(spec.get("sign-key") or None)
        try:
            decision = dev.consider(
                str(head.get("kind")),
                [str(l) for l in head["labels"]],
                arrays,
                head.get("meta") if isinstance(head.get("meta"), dict) else {},
                provenance=head.get("provenance") if isinstance(head.get("provenance"), dict) else {},
                tolerance_pp=float(spec.get("tolerance", DEFAULT_TOLERANCE_PP)),
                force=bool(spec.get("force", False)),
                dry_run=bool(spec.get("dry-run", False)),
                wait=float(spec.get("lock-wait", 0)),
                signer=signer,
                signature=head.get("signature"),
            )
        except et.GateError as exc:
            decision = {"accepted": False, "device": dev.name, "reason": str(exc), "exit_code": exc.exit_code}
    except et.EdgetlError as exc:
        decision = {"accepted": False, "reason": str(exc), "exit_code": getattr(exc, "exit_code", 2)}
    if spec.get("report"):
        Path(str(spec["report"])).write_text(json.dumps(decision, default=_jsonable, indent=1))
    return Message(
        content=RecordDict(
            {
                "meta": ConfigRecord({"json": json.dumps(decision, default=_jsonable)}),
                "metrics": MetricRecord({"num-examples": 1, "accepted": int(bool(decision.get("accepted")))}),
            }
        ),
        reply_to=msg,
    )


client_app = F["ClientApp"]()


@client_app.train()
def _client_train(msg, context):
    return client_train(msg, context, dict(context.node_config))


@client_app.evaluate()
def _client_evaluate(msg, context):
    return client_deliver(msg, context, dict(context.node_config))


# ============================================================================================ simulation
def make_sim_client_app(specs: list[dict]):
    """A ClientApp for ``run_simulation``: virtual SuperNode ``partition-id`` i is ``specs[i]``."""
    app = F["ClientApp"]()

    def spec_of(context) -> dict:
        return specs[int(context.node_config["partition-id"])]

    @app.train()
    def _train(msg, context):
        return client_train(msg, context, spec_of(context))

    @app.evaluate()
    def _evaluate(msg, context):
        return client_deliver(msg, context, spec_of(context))

    return app


def simulate(
    bundle,
    specs: list[dict],
    *,
    kind=None,
    base=DEFAULT_BASE,
    rounds=30,
    l2=None,
    write=True,
    cpus_per_device: float = 1.0,
    verbose: bool = False,
) -> dict:
    """One fleet round with Flower's simulation engine (Ray): the server bundle ``bundle`` and one
    virtual device per entry of ``specs`` (``{"bundle", "data", "name"?, "tolerance"?, ...}``)."""
    try:
        from flwr.simulation import run_simulation
    except ImportError as exc:  # pragma: no cover
        raise et.MissingDependency(
            f"simulation needs Flower's simulation extra ({exc}): pip install 'edgetl[fleet-sim]'"
        ) from None
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise et.MissingDependency("simulation needs Ray: pip install 'edgetl[fleet-sim]' (flwr[simulation])")
    holder: dict = {}
    app = F["ServerApp"]()

    @app.main()
    def _main(grid, context):
        try:
            holder["report"] = run_server(
                grid,
                bundle=bundle,
                kind=kind,
                base=base,
                min_devices=len(specs),
                wait=300,
                rounds=rounds,
                l2=l2,
                write=write,
            )
        except et.EdgetlError as exc:
            holder["error"] = exc

    import logging
    import warnings

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=app,
            client_app=make_sim_client_app(specs),
            num_supernodes=len(specs),
            backend_config={
                "client_resources": {"num_cpus": cpus_per_device, "num_gpus": 0.0},
                "init_args": {"log_to_driver": verbose, "include_dashboard": False},
            },
            verbose_logging=verbose,
        )
    if "error" in holder:
        raise holder["error"]
    if "report" not in holder:
        raise FleetError("the simulation ended without a report (see Flower's log above)")
    return holder["report"]
