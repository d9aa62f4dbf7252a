"""``edgetl fleet``: learn one head from what many devices learned, on Flower, without moving images.

A click group meant to be attached to edgetl's CLI as ``edgetl fleet``; until then run it as
``python -m edgetl.fleet.cli``. Errors print one ``error: ...`` line and exit non-zero (2 bad
input, 3 a device's gate refused the global head, 4 the bundle is busy, 5 a signature check);
``--json`` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
import numpy as np

from ..core.commands import handle_errors
from ..core.console import clip
from . import _edgetl as et
from .summaries import DEFAULT_BASE

_SPLITS = ("class", "dirichlet")


def _echo(report: dict, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        click.echo(text)


def _tls(cert, key, ca, insecure: bool, *, server: bool):
    if insecure:
        if cert or key or ca:
            raise et.ConfigError("--insecure and TLS files exclude each other")
        return None
    if server:
        if not (cert and key and ca):
            raise et.ConfigError(
                "TLS needs --tls-cert, --tls-key and --tls-ca (or --insecure for a test on one machine)"
            )
        return {"certfile": str(cert), "keyfile": str(key), "ca": str(ca)}
    if not ca:
        raise et.ConfigError("give --root-ca CA.pem to check the server's certificate (or --insecure on one machine)")
    return str(ca)


@click.group(name="fleet")
def fleet() -> None:
    """Fleet learning: merge what many devices learned into one head, on Flower.

    \b
    A round: the server (`serve BUNDLE`) and N devices (`join BUNDLE DATA` on each) exchange
    summaries of the devices' labelled images -- sufficient statistics (counts, sums, Gram or
    scatter matrices) or weights, never images -- for a few steps; the server merges them into one
    head and writes it as a new version of its bundle (source "fleet"); each device accepts that
    head only through the same gate, versioning and rollback as `edgetl adapt`.
    `simulate` runs a whole round on one machine over one dataset split among N devices.

    \b
    Merges: ridge (exact, for linear bundles), prototype (exact), linear (FedNCM + FedAvg),
    mlp (FedAvg), padim (exact), patchcore (coreset of the devices' coresets).
    """


@fleet.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--devices",
    "-n",
    type=click.IntRange(1, 100_000),
    default=2,
    show_default=True,
    help="Devices that must join before the round starts (and stay to its end).",
)
@click.option(
    "--address",
    default="127.0.0.1:9092",
    show_default=True,
    help="host:port the SuperLink listens on (Flower's Fleet, Control and Runtime APIs share it).",
)
@click.option(
    "--kind",
    type=click.Choice(["ridge", "prototype", "linear", "mlp", "padim", "patchcore"]),
    help="Merge to run  [default: ridge for linear bundles, else the bundle's head kind]",
)
@click.option(
    "--base",
    type=click.Choice(["current", "none"]),
    default=DEFAULT_BASE,
    show_default=True,
    help="Also merge what the bundle already knows (its replay exemplars / anomaly statistics).",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 10_000),
    default=30,
    show_default=True,
    help="FedAvg rounds after the first step (linear and mlp merges only).",
)
@click.option("--l2", type=float, help="Ridge / FedAvg penalty  [default: ridge: chosen by GCV; FedAvg: 0.01]")
@click.option("--no-new-classes", is_flag=True, help="Refuse devices that bring classes the bundle does not have.")
@click.option(
    "--wait", type=click.FloatRange(0), default=300, show_default=True, help="Seconds to wait for the devices."
)
@click.option("--timeout", type=click.FloatRange(1), default=600, show_default=True, help="Seconds one step may take.")
@click.option("--tls-cert", type=click.Path(exists=True, path_type=Path), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, path_type=Path), help="Server private key (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, path_type=Path), help="CA certificate that signed it (PEM).")
@click.option("--insecure", is_flag=True, help="No TLS (a test on one machine only).")
@click.option(
    "--auth-key",
    "auth_keys",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="A device's public key (OpenSSH, NIST EC); repeat per device. Turns on Flower's node "
    "authentication: only these devices may join.",
)
@click.option(
    "--sign",
    "sign_key",
    type=click.Path(exists=True, path_type=Path),
    envvar="EDGETL_SIGN_KEY",
    help="Sign the new head version with this key (from `edgetl keygen`).",
)
@click.option(
    "--lock-wait", type=click.FloatRange(0), default=0, help="Seconds to queue behind another writer of the bundle."
)
@click.option("--log-dir", type=click.Path(path_type=Path), help="Keep Flower's logs here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def serve(
    bundle,
    devices,
    address,
    kind,
    base,
    rounds,
    l2,
    no_new_classes,
    wait,
    timeout,
    tls_cert,
    tls_key,
    tls_ca,
    insecure,
    auth_keys,
    sign_key,
    lock_wait,
    log_dir,
    as_json,
):
    """Run one fleet round for BUNDLE and write the merged head as its new version.

    Starts a Flower SuperLink on --address, waits for --devices devices to `join`, runs the
    merge's steps, writes heads/vN.npz (+ fused model) with the round's provenance in the manifest
    (devices, steps, class counts, refusals; source "fleet"), sends the head to the devices and
    reports what each device's gate decided. A device whose summary is malformed is left out with
    its reason; the round fails when fewer than --devices remain.
    """
    from . import deploy

    tls = _tls(tls_cert, tls_key, tls_ca, insecure, server=True)
    report = deploy.serve(
        bundle,
        address=address,
        devices=devices,
        kind=kind,
        base=base,
        rounds=rounds,
        l2=l2,
        allow_new_classes=not no_new_classes,
        wait=wait,
        timeout=timeout,
        tls=tls,
        auth_keys=list(auth_keys),
        sign_key=sign_key,
        lock_wait=lock_wait,
        log_dir=log_dir,
    )
    if report.get("error"):
        err = et.FleetError(report["error"])
        err.exit_code = int(report.get("exit_code", 2))
        raise err
    deliveries = report.get("deliveries", {})
    lines = [
        f"{bundle}: fleet version v{report.get('version')} ({report.get('kind')} merge of {report.get('devices')} "
        f"devices, {report.get('rows', report.get('images', '?'))} images, {report.get('rounds')} steps)"
    ]
    for who, d in sorted(deliveries.items()):
        lines.append(
            f"  {who}: " + (f"accepted as v{d.get('version')}" if d.get("accepted") else f"refused: {d.get('reason')}")
        )
    for r in report.get("refused", []):
        lines.append(f"  left out: {r.get('reason')}")
    _echo(report, as_json, "\n".join(lines))


@fleet.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--superlink", default="127.0.0.1:9092", show_default=True, help="The server's host:port.")
@click.option("--name", help="This device's name in the server's report  [default: the bundle folder's name]")
@click.option(
    "--tolerance",
    type=click.FloatRange(0, 100),
    default=5.0,
    show_default=True,
    help="Held-out accuracy the global head may lose against the current head, in points.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0.05, 0.9),
    default=0.25,
    show_default=True,
    help="Share of the local images (per class) held out for the gate and never summarised.",
)
@click.option("--force", is_flag=True, help="Accept the global head even if the gate refuses it.")
@click.option("--dry-run", is_flag=True, help="Take part and judge the head, write nothing.")
@click.option(
    "--root-ca", type=click.Path(exists=True, path_type=Path), help="CA certificate to check the server with (PEM)."
)
@click.option("--insecure", is_flag=True, help="No TLS (a test on one machine only).")
@click.option(
    "--auth-key",
    type=click.Path(exists=True, path_type=Path),
    help="This device's private key (OpenSSH, NIST EC) for Flower's node authentication.",
)
@click.option(
    "--sign",
    "sign_key",
    type=click.Path(exists=True, path_type=Path),
    envvar="EDGETL_SIGN_KEY",
    help="Sign an accepted version with this device key.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1),
    default=1800,
    show_default=True,
    help="Seconds to wait for a round to reach this device and finish.",
)
@click.option(
    "--wait",
    "lock_wait",
    type=click.FloatRange(0),
    default=0,
    help="Seconds to queue behind another writer of the bundle (as every other edgetl command's --wait).",
)
# the spelling before --wait, still accepted
@click.option("--lock-wait", "lock_wait_alias", type=click.FloatRange(0), hidden=True)
@click.option("--log-dir", type=click.Path(path_type=Path), help="Keep Flower's log here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def join(
    bundle,
    data,
    superlink,
    name,
    tolerance,
    holdout,
    force,
    dry_run,
    root_ca,
    insecure,
    auth_key,
    sign_key,
    timeout,
    lock_wait,
    lock_wait_alias,
    log_dir,
    as_json,
):
    """Take part in one fleet round with BUNDLE and the labelled images in DATA.

    DATA is laid out as for `edgetl adapt` (DATA/<class>/*.png; defect bundles: good images).
    The images go through the bundle's own backbone; a stratified part is held out and only the
    rest is summarised. The global head the server sends back becomes a new version only if it is
    no worse on the held-out images than the current head (within --tolerance) and knows every
    class the current head knows; otherwise the current version stays and the exit code is 3.
    `edgetl rollback BUNDLE` undoes an accepted one. The device receives arrays only, never code.
    """
    from . import deploy

    lock_wait = lock_wait if lock_wait_alias is None else lock_wait_alias
    root_ca = _tls(None, None, root_ca, insecure, server=False)
    d = deploy.join(
        bundle,
        data,
        superlink=superlink,
        name=name,
        tolerance_pp=tolerance,
        force=force,
        dry_run=dry_run,
        root_ca=root_ca,
        auth_key=auth_key,
        sign_key=sign_key,
        timeout=timeout,
        holdout=holdout,
        lock_wait=lock_wait,
        log_dir=log_dir,
    )
    if not d.get("accepted") and not dry_run:
        err = et.GateError(d.get("reason") or "; ".join(d.get("reasons", [])) or "the global head was not accepted")
        err.exit_code = int(d.get("exit_code", 3))
        if as_json:
            click.echo(json.dumps(d, default=str))
        click.echo(f"error: {str(err).splitlines()[0]}", err=True)
        sys.exit(err.exit_code)
    text = (
        f"{bundle}: dry run, the global head would be " + ("refused" if d.get("reasons") else "accepted")
        if dry_run
        else f"{bundle}: global head accepted as v{d.get('version')}"
    )
    fig = d.get("accuracy_before"), d.get("accuracy_after")
    if fig[0] is not None:
        text += f" (held-out accuracy {fig[0]:.1%} -> {fig[1]:.1%} on {d.get('heldout_images')} images)"
    _echo(d, as_json, text)


def split_dataset(
    labels: list[str], devices: int, *, split: str, classes_per_device: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Row indices per device: ``class`` gives each device ``classes_per_device`` classes (classes
    dealt round-robin, a class shared by several devices is divided between them); ``dirichlet``
    draws each class's shares over devices from Dirichlet(alpha)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    lab = np.array(labels)
    parts: list[list[int]] = [[] for _ in range(devices)]
    if split == "class":
        if not 1 <= classes_per_device <= len(names):
            raise et.ConfigError(f"--classes-per-device must be 1..{len(names)}")
        owners: dict[str, list[int]] = {n: [] for n in names}
        order = list(rng.permutation(len(names)))
        for dev in range(devices):
            for j in range(classes_per_device):
                owners[names[order[(dev * classes_per_device + j) % len(names)]]].append(dev)
        for n in names:
            rows = rng.permutation(np.flatnonzero(lab == n))
            who = owners[n]
            if not who:
                continue
            for i, chunk in enumerate(np.array_split(rows, len(who))):
                parts[who[i]] += chunk.tolist()
    elif split == "dirichlet":
        if not alpha > 0:
            raise et.ConfigError("--alpha must be > 0")
        for n in names:
            rows = rng.permutation(np.flatnonzero(lab == n))
            share = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(share)[:-1] * len(rows)).astype(int)
            for dev, chunk in enumerate(np.split(rows, cuts)):
                parts[dev] += chunk.tolist()
    else:
        raise et.ConfigError(f"--split {split!r}: choose {' or '.join(_SPLITS)}")
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


@fleet.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--bundle",
    "-b",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A bundle made by `edgetl fit`: copied as the server's and every device's bundle.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="New folder for the copies: server.bundle, device-I.bundle and device-I/ image folders.",
)
@click.option("--devices", "-n", type=click.IntRange(2, 1000), default=8, show_default=True)
@click.option(
    "--split",
    type=click.Choice(_SPLITS),
    default="class",
    show_default=True,
    help="class: each device sees --classes-per-device classes; dirichlet: class shares ~ Dirichlet(--alpha).",
)
@click.option("--classes-per-device", type=click.IntRange(1), default=2, show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True)
@click.option(
    "--engine",
    type=click.Choice(["flower", "none"]),
    default="flower",
    show_default=True,
    help="flower: Flower's simulation engine (Ray, the fleet-sim extra); none: in process.",
)
@click.option(
    "--kind", type=click.Choice(["ridge", "prototype", "linear", "mlp"]), help="Merge to run  [default: as serve]"
)
@click.option(
    "--base",
    type=click.Choice(["current", "none"]),
    default=DEFAULT_BASE,
    show_default=True,
    help="current: the bundle's own training data takes part (as fleet serve does); none: devices only.",
)
@click.option("--rounds", type=click.IntRange(1, 10_000), default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def simulate(data, bundle, out, devices, split, classes_per_device, alpha, engine, kind, base, rounds, seed, as_json):
    """Simulate a fleet round on one machine: DATA (an image folder) split among N devices.

    Each device gets a copy of --bundle and its share of DATA (by class, or Dirichlet-skewed);
    the server copy merges their summaries; each device gates the global head on its held-out
    images. Prints per device the held-out accuracy of its current head and of the global head.
    """
    paths, labels, _, _ = et.labelled_images(data)
    if not paths:
        raise et.DataError(f"{data}: no labelled images; expected {data}/<class>/<image>")
    if out.exists() and any(out.iterdir()):
        raise et.ConfigError(f"{out}: exists and is not empty; choose a new --out")
    parts = split_dataset(labels, devices, split=split, classes_per_device=classes_per_device, alpha=alpha, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, out / "server.bundle", ignore=shutil.ignore_patterns(".edgetl.lock"))
    specs = []
    for i, rows in enumerate(parts):
        if len(rows) == 0:
            continue
        folder = out / f"device-{i}"
        for r in rows:
            dst = folder / labels[r] / f"{r:06d}{Path(paths[r]).suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(paths[r], dst)
        shutil.copytree(bundle, out / f"device-{i}.bundle", ignore=shutil.ignore_patterns(".edgetl.lock"))
        specs.append(
            {"bundle": str(out / f"device-{i}.bundle"), "data": str(folder), "name": f"device-{i}", "seed": seed}
        )
    if engine == "flower":
        from . import flower

        report = flower.simulate(str(out / "server.bundle"), specs, kind=kind, base=base, rounds=rounds)
    else:
        from .device import Device
        from .server import FleetRound, run_round

        devs = {s["name"]: Device.open(s["bundle"], s["data"], name=s["name"], seed=seed) for s in specs}
        report = run_round(FleetRound(out / "server.bundle", kind=kind, base=base, rounds=rounds), devs)
    lines = [
        f"{out / 'server.bundle'}: v{report.get('version')} from {report.get('devices')} devices "
        f"({report.get('kind')} merge, {split} split)"
    ]
    lines.append(f"  {'device':<40} {'held-out':>8} {'current':>8} {'global':>8}  decision")
    for who, d in sorted(report.get("deliveries", {}).items()):
        b, a = d.get("accuracy_before"), d.get("accuracy_after")
        fmt = lambda v: "-" if v is None else f"{v:.1%}"
        lines.append(
            f"  {who:<40} {d.get('heldout_images', '-')!s:>8} {fmt(b):>8} {fmt(a):>8}  "
            + ("accepted" if d.get("accepted") else f"refused: {clip(d.get('reason', ''), 160)}")
        )
    _echo(report, as_json, "\n".join(lines))


main = fleet

if __name__ == "__main__":  # python -m edgetl.fleet.cli ...
    fleet(prog_name="edgetl fleet")
