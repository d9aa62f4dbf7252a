"""Running a fleet round for real: the Flower app folder, SuperLink / SuperNode processes, TLS and
node authentication, and ``serve`` (the server's side) / ``join`` (a device's), which
``edgetl fleet serve`` / ``join`` call. The apps themselves are in :mod:`edgetl.fleet.flower`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..core.console import clip
from . import _edgetl as et
from .device import DEFAULT_TOLERANCE_PP, HOLDOUT
from .summaries import DEFAULT_BASE, FleetError

# ============================================================================================ deployment
APP_PYPROJECT = """\
# Written by edgetl fleet: a Flower App whose code is the installed edgetl package.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgetl-fleet"
version = "1.0.0"
description = "edgetl fleet round"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgetl"

[tool.flwr.app.components]
serverapp = "edgetl.fleet.flower:server_app"
clientapp = "edgetl.fleet.flower:client_app"

[tool.flwr.app.config]
bundle = ""
kind = ""
base = "current"
min-devices = 2
wait = 120.0
timeout = 600.0
rounds = 30
l2 = -1.0
allow-new-classes = true
sign-key = ""
lock-wait = 0.0
report = ""
"""


def write_app_dir(folder) -> Path:
    """The Flower App folder ``flwr run`` ships to the SuperLink (a pyproject.toml only: the code
    is edgetl itself, installed on the server and on every device)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _toml_str(v: str) -> str:
    return json.dumps(str(v))


class FlowerProcess:
    """A Flower daemon (``flower-superlink`` / ``flower-supernode``) in its own process group, with
    its log in a file; :meth:`stop` ends it and the SuperExec it spawned (found by its
    ``--parent-pid``), by process id."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd=None):
        self.args = args
        self.log = Path(log)
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            args, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _children(self) -> list[int]:
        out = []
        mark = f"--parent-pid\x00{self.proc.pid}\x00"
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if mark in (d / "cmdline").read_text(errors="replace") + "\x00":
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def stop(self, timeout: float = 10.0) -> None:
        kids = self._children()
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        deadline = time.monotonic() + 5
        for pid in kids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._fh.close()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def superlink_args(address: str, *, tls: dict | None = None, auth: bool = False) -> list[str]:
    """``flower-superlink`` on ``host:port`` (Fleet, Control and Runtime APIs share that port in
    Flower 1.42); ``tls`` = {certfile, keyfile, ca}; ``auth`` enables SuperNode authentication."""
    host, port = address.rsplit(":", 1)
    args = [_bin("flower-superlink"), "--host", host, "--port", port, "--disable-runtime-dependency-installation"]
    if tls:
        args += [
            "--ssl-certfile",
            str(tls["certfile"]),
            "--ssl-keyfile",
            str(tls["keyfile"]),
            "--ssl-ca-certfile",
            str(tls["ca"]),
        ]
    else:
        args += ["--insecure"]
    if auth:
        args += ["--enable-supernode-auth"]
    return args


def supernode_args(superlink: str, node_config: dict, *, port: int, root_ca=None, auth_key=None) -> list[str]:
    """``flower-supernode`` joining ``superlink`` with this device's ``node_config``."""
    cfg = " ".join(
        f"{k}={_toml_str(v) if isinstance(v, (str, Path)) else json.dumps(v)}" for k, v in node_config.items()
    )
    args = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", cfg]
    args += ["--root-certificates", str(root_ca)] if root_ca else ["--insecure"]
    if auth_key:
        args += ["--auth-supernode-private-key", str(auth_key)]
    return args


def flwr_home(folder, address: str, *, root_ca=None) -> Path:
    """A ``FLWR_HOME`` whose config names the SuperLink connection ``fleet`` (TLS with ``root_ca``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "fleet"', "", "[superlink.fleet]", f"address = {_toml_str(address)}"]
    lines.append(f"root-certificates = {_toml_str(Path(root_ca).resolve())}" if root_ca else "insecure = true")
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    return folder


def flwr_env(home: Path) -> dict:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    # the daemons start flower-superexec / flwr-serverapp / flwr-clientapp through PATH
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # the ClientApp that gates the delivered head runs in a child process: it gets the policy
    # this process has (edgetl --trust or EDGETL_TRUST) by name
    trust = et.trust_path()
    if trust:
        env["EDGETL_TRUST"] = str(Path(trust).resolve())
    return env


def register_supernode(public_key, home: Path, timeout: float = 60.0) -> str:
    """``flwr supernode register KEY fleet``: let the SuperNode holding this key's private half in."""
    r = subprocess.run(
        [_bin("flwr"), "supernode", "register", str(public_key), "fleet"],
        env=flwr_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise FleetError(f"flwr supernode register failed: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
    return r.stdout


def flwr_run(app_dir: Path, home: Path, run_config: dict, *, timeout: float = 900.0, log: Path | None = None) -> int:
    """``flwr run APP fleet --run-config FILE --stream`` and wait for the run to finish."""
    cfg = Path(home) / "run-config.toml"
    cfg.write_text(
        "".join(f"{k} = {json.dumps(v) if not isinstance(v, Path) else _toml_str(v)}\n" for k, v in run_config.items())
    )
    args = [_bin("flwr"), "run", str(app_dir), "fleet", "--run-config", str(cfg), "--stream"]
    with open(log or os.devnull, "ab") as fh:
        return subprocess.run(args, env=flwr_env(home), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode


def wait_for_port(address: str, timeout: float = 30.0, proc: FlowerProcess | None = None) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise FleetError(f"{proc.args[0]} exited: {proc.tail(3)}")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise FleetError(f"nothing listens on {address} after {timeout:g} s")


# ============================================================================================ serve / join
def serve(
    bundle,
    *,
    address: str = "127.0.0.1:9092",
    devices: int = 2,
    kind=None,
    base: str = DEFAULT_BASE,
    rounds: int = 30,
    l2=None,
    allow_new_classes: bool = True,
    wait: float = 120.0,
    timeout: float = 600.0,
    tls: dict | None = None,
    auth_keys: list | None = None,
    sign_key=None,
    workdir=None,
    lock_wait: float = 0.0,
    log_dir=None,
) -> dict:
    """Run one fleet round as a Flower deployment: start a SuperLink on ``address``, (with
    ``auth_keys``) enable SuperNode authentication and register those public keys, submit the
    fleet ServerApp with ``flwr run``, wait for ``devices`` SuperNodes and the round, stop the
    SuperLink. Returns the round's report (``error`` set when the round failed)."""
    import tempfile

    bundle = str(Path(bundle).resolve())
    et.load_bundle(bundle)  # a clear error now rather than inside the ServerApp
    with tempfile.TemporaryDirectory(prefix="edgetl-fleet-", dir=workdir) as tmp:
        tmp = Path(tmp)
        link = FlowerProcess(
            superlink_args(address, tls=tls, auth=bool(auth_keys)),
            tmp / "superlink.log",
            env=flwr_env(tmp / "home"),
            cwd=tmp,
        )
        try:
            wait_for_port(address, 60, link)
            home = flwr_home(tmp / "home", address, root_ca=(tls or {}).get("ca"))
            for key in auth_keys or []:
                register_supernode(key, home)
            report_path = tmp / "report.json"
            rc = {
                "bundle": bundle,
                "kind": kind or "",
                "base": base,
                "min-devices": int(devices),
                "wait": float(wait),
                "timeout": float(timeout),
                "rounds": int(rounds),
                "l2": -1.0 if l2 is None else float(l2),
                "allow-new-classes": bool(allow_new_classes),
                "sign-key": str(sign_key or ""),
                "lock-wait": float(lock_wait),
                "report": str(report_path),
            }
            code = flwr_run(write_app_dir(tmp / "app"), home, rc, timeout=wait + timeout * 2 + 60, log=tmp / "run.log")
            if report_path.exists():
                report = json.loads(report_path.read_text())
            else:
                tail = (tmp / "run.log").read_text(errors="replace").strip().splitlines()[-3:]
                report = {
                    "error": f"the Flower run ended (exit {code}) without a report: {' | '.join(tail)}",
                    "exit_code": 2,
                }
        finally:
            link.stop()
            _keep_logs(log_dir, [link.log, tmp / "run.log"])
    return report


def _keep_logs(log_dir, files) -> None:
    """Copy the Flower daemons' logs to ``log_dir`` (``--log-dir``) before the work folder goes."""
    if not log_dir:
        return
    import shutil

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    for f in files:
        if Path(f).exists():
            shutil.copy(f, Path(log_dir) / f"{int(time.time())}-{os.getpid()}-{Path(f).name}")


def join(
    bundle,
    data,
    *,
    superlink: str = "127.0.0.1:9092",
    name=None,
    tolerance_pp: float = DEFAULT_TOLERANCE_PP,
    force: bool = False,
    dry_run: bool = False,
    root_ca=None,
    auth_key=None,
    sign_key=None,
    timeout: float = 900.0,
    holdout: float = HOLDOUT,
    seed: int = 0,
    lock_wait: float = 0.0,
    workdir=None,
    log_dir=None,
    linger: float = 10.0,
) -> dict:
    """Join one fleet round as a device: run a SuperNode for ``bundle`` + ``data`` until the
    round's global head has been judged by this device's gate, then stop. Returns the decision."""
    import tempfile

    bundle = str(Path(bundle).resolve())
    et.load_bundle(bundle)
    if not Path(data).exists():
        raise et.DataError(f"{data}: no such folder of images")
    with tempfile.TemporaryDirectory(prefix="edgetl-join-", dir=workdir) as tmp:
        tmp = Path(tmp)
        report = tmp / "decision.json"
        cfg = {
            "bundle": bundle,
            "data": str(Path(data).resolve()),
            "name": name or Path(bundle).name,
            "tolerance": float(tolerance_pp),
            "force": bool(force),
            "dry-run": bool(dry_run),
            "holdout": float(holdout),
            "seed": int(seed),
            "lock-wait": float(lock_wait),
            "sign-key": str(sign_key or ""),
            "report": str(report),
        }
        node = FlowerProcess(
            supernode_args(superlink, cfg, port=free_port(), root_ca=root_ca, auth_key=auth_key),
            tmp / "supernode.log",
            env=flwr_env(tmp / "home"),
            cwd=tmp,
        )
        try:
            deadline = time.monotonic() + timeout
            while not report.exists():
                if not node.alive():
                    raise FleetError(_supernode_failure(node))
                if time.monotonic() > deadline:
                    raise FleetError(
                        f"no fleet round reached this device within {timeout:g} s (is the server at {superlink}?)"
                    )
                time.sleep(0.25)
            # The decision is written before the ClientApp returns; stop the SuperNode only once it
            # has pushed that reply to the SuperLink (its log says so), or after a grace period.
            grace = time.monotonic() + 30
            while time.monotonic() < grace and node.alive():
                text = node.log.read_text(errors="replace")
                at = text.rfind("Sending: evaluate")
                if at >= 0 and "Sent successfully" in text[at:]:
                    break
                time.sleep(0.25)
            # A SuperNode that leaves before the ServerApp has collected its reply turns that reply
            # into "Node Unavailable" on the server; stay connected a little longer.
            end = time.monotonic() + linger
            while time.monotonic() < end and node.alive():
                time.sleep(0.25)
            decision = json.loads(report.read_text())
        finally:
            node.stop()
            _keep_logs(log_dir, [node.log])
    return decision


def _supernode_failure(node: FlowerProcess) -> str:
    """One line for a SuperNode that gave up, from its log."""
    text = node.log.read_text(errors="replace") if node.log.exists() else ""
    if "Failed to activate SuperNode" in text or "code: 2004" in text:
        return (
            "the SuperLink refused this device: with node authentication on, its public key must be "
            "registered (serve --auth-key DEVICE.pub) and join given the matching --auth-key"
        )
    bad = [l.strip() for l in text.splitlines() if "ERROR" in l or "Failed" in l or "Error" in l]
    return "flower-supernode exited before the round ended" + (f": {clip(bad[-1], 300)}" if bad else "")
