"""One contract for every task in the registry, through the CLI as a user types it:

    fit -> info -> predict -> eval -> adapt -> history -> predict -> rollback -> export

then through the layers above the device, for the same bundle: the service answering one request
(in process, the application uvicorn runs), the report (evaluating every head version), and one
fleet round (a device's summary, the merge, the device's gate on the merged head).

Every device-side step runs in a subprocess where torch cannot be imported. A task added to
``edgetl.tasks.TASKS`` must bring a ``CASES`` entry here (the first test says so), so it cannot
ship without passing the same life as the others. What is specific to a task (its accuracy, its
heat maps, its data formats) is tested in that task's own tests.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgetl import tasks
from tests.conftest import run_cli
from tests.serve.conftest import TOKEN, auth


@dataclass
class Case:
    make: Callable[[Path, Path], dict]  # (root, surfaces fixture) -> data, inputs, eval, adapt
    metric: str  # the headline figure eval reports
    fit_args: tuple[str, ...] = ()


def _classify(root: Path, surfaces: Path) -> dict:
    new = root / "new"
    for c in ("brick", "wood"):  # newly labelled images of known classes
        shutil.copytree(surfaces / "val" / c, new / c)
    return {
        "data": surfaces,
        "inputs": sorted(str(p) for p in (surfaces / "val" / "coins").glob("*.png"))[:3],
        "eval": surfaces / "val",
        "adapt": new,
        "fleet": new,
    }


def _text(root: Path, surfaces: Path) -> dict:
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers", reason="fitting a text bundle exports the encoder (text-train extra)")
    from edgetl.datasets.tickets import make_tickets

    make_tickets(root / "t", seed=0, per_class=20, val_per_class=8)
    rows = (root / "t" / "tickets.csv").read_text().splitlines()
    (root / "new.csv").write_text("\n".join([rows[0], *rows[-30:]]) + "\n")  # validation rows, relabelled as new
    return {
        "data": root / "t" / "tickets.csv",
        "inputs": ["hydraulic oil drips from the pump seal", "HMI froze"],
        "eval": root / "t" / "tickets.csv",
        "adapt": root / "new.csv",
        "fleet": root / "new.csv",
    }


def _anomaly(root: Path, surfaces: Path) -> dict:
    from edgetl.datasets.images import make_defects

    make_defects(root / "d", seed=0, n_train_good=24, n_test_good=8, n_test_defect=10, size=160)
    make_defects(root / "more", seed=5, n_train_good=6, n_test_good=0, n_test_defect=0, size=160)
    return {
        "data": root / "d",
        "inputs": sorted(str(p) for p in (root / "d" / "test").glob("*/000.png"))[:3],
        "eval": root / "d",
        "adapt": root / "more" / "train" / "good",
        "fleet": root / "more" / "train" / "good",
    }


CASES = {
    "classify": Case(_classify, "accuracy", ("--calibration-size", "32")),
    "text": Case(_text, "accuracy"),
    # PatchCore: the defect head a fleet round merges (the default combined head's life is in
    # tests/serve/test_defects.py and tests/unit/test_anomaly.py).
    "anomaly": Case(_anomaly, "image_auroc", ("--calibration-size", "24", "--head", "patchcore")),
}


def test_every_registered_task_has_a_contract_case():
    assert set(CASES) == set(tasks.TASKS), "add the new task to CASES: it must pass the same contract"


def _json(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_task_contract(name, surfaces, cache_dir, tmp_path, no_torch_env):
    case = CASES[name]
    d = case.make(tmp_path, surfaces)
    bundle = tmp_path / f"{name}.bundle"

    fitted = _json(run_cli("fit", d["data"], "--out", bundle, *case.fit_args, "--allow-drop", "--json"))
    assert fitted["task"] == name and fitted["precision"] == "int8"
    assert fitted["gate"]["verdict"] in ("passed", "inconclusive", "refused") and fitted["fused_parity"]["passed"]
    assert fitted["gate"]["metric"] == tasks.get(name).gate_metric

    info = _json(run_cli("info", bundle, "--json", env=no_torch_env))
    assert info["verified"] and info["task"] == name and info["head"]["current"] == 1
    labels = info["labels"]

    preds = _json(run_cli("predict", bundle, *d["inputs"], "--json", env=no_torch_env))
    assert len(preds["predictions"]) == len(d["inputs"]) and preds["head_version"] == 1
    assert all(p["label"] in [*labels, "unknown"] for p in preds["predictions"])

    m = _json(run_cli("eval", bundle, d["eval"], "--json", env=no_torch_env))
    assert m["head_version"] == 1 and m[case.metric] is not None and 0.0 <= m[case.metric] <= 1.0

    adapted = _json(run_cli("adapt", bundle, d["adapt"], "--force", "--json", env=no_torch_env))
    assert adapted["version"] == 2 and adapted["accepted"] and adapted["task"] == name

    hist = _json(run_cli("history", bundle, "--json", env=no_torch_env))["versions"]
    assert [v["version"] for v in hist] == [1, 2] and [v["current"] for v in hist] == [False, True]
    assert hist[1]["source"].startswith("adapt")
    assert _json(run_cli("predict", bundle, *d["inputs"], "--json", env=no_torch_env))["head_version"] == 2

    back = _json(run_cli("rollback", bundle, "--json", env=no_torch_env))
    assert back["current"] == 1
    again = _json(run_cli("predict", bundle, *d["inputs"], "--json", env=no_torch_env))
    assert [p.get("confidence", p.get("score")) for p in again["predictions"]] == pytest.approx(
        [p.get("confidence", p.get("score")) for p in preds["predictions"]], rel=1e-6, abs=1e-7
    )

    fp32 = tmp_path / "fp32.bundle"
    exported = _json(
        run_cli("export", bundle, "--out", fp32, "--precision", "fp32", "--runtime", "onnxruntime", "--json")
    )
    assert exported["task"] == name and exported["precision"] == "fp32" and exported["runtime"] == "onnxruntime"
    assert _json(run_cli("info", tmp_path / "fp32.bundle", "--json", env=no_torch_env))["verified"]

    _serves(bundle, d["inputs"][0], preds["predictions"][0], tmp_path / "review")

    page = tmp_path / "report.html"
    rep = _json(run_cli("report", bundle, d["eval"], "--all-versions", "--out", page, "--json", env=no_torch_env))
    assert page.stat().st_size > 0 and rep["task"] == name and rep["figures"]["head_version"] == 1
    assert rep["figures"][case.metric] == pytest.approx(m[case.metric], abs=1e-6)

    # On the FP32 ONNX Runtime export, as tests/fleet rounds run: with an OpenVINO model just loaded
    # in the process, a device's gate was seen to stall in numpy's matrix product while OpenVINO's
    # telemetry thread forked a process.
    _fleet_round(fp32, d["fleet"], tmp_path, before=1)


def _serves(bundle: Path, item: str, want: dict, review: Path) -> None:
    """The service answers one request as ``edgetl predict`` did (head v1 is current again)."""
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
    from starlette.testclient import TestClient

    from edgetl.serve import ServeOptions, create_app

    task = tasks.for_bundle(json.loads((bundle / "manifest.json").read_text()))
    app, _ = create_app(bundle, ServeOptions(token=TOKEN, review=review))
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        if task.reads_texts:
            r = client.post("/predict", json={"text": item}, headers=auth())
        else:
            r = client.post("/predict", content=Path(item).read_bytes(), headers=auth())
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["label"] == want["label"] and got["head_version"] == 1
        figure = "score" if "score" in want else "confidence"
        assert got[figure] == pytest.approx(want[figure], rel=1e-4, abs=1e-6)
        assert client.get("/history", headers=auth()).status_code == 200


def _fleet_round(bundle: Path, data: Path, tmp_path: Path, *, before: int) -> None:
    """One fleet round: a device's summary of its data, the merge on the server's copy, and the
    device's gate on the merged head (accepted, or refused with its reason)."""
    from edgetl.fleet import _edgetl as et
    from edgetl.fleet.device import Device
    from edgetl.fleet.server import FleetRound, run_round

    server, device = tmp_path / "server.bundle", tmp_path / "device.bundle"
    shutil.copytree(bundle, server)
    shutil.copytree(bundle, device)
    report = run_round(FleetRound(server), {"cam0": Device.open(device, data, name="cam0")})
    assert report["devices"] == 1 and report["version"] == before + 1
    assert et.load_bundle(server).head_entry()["source"] == "fleet"
    decision = report["deliveries"]["cam0"]
    assert decision["accepted"] or decision["reason"], decision
    if decision["accepted"]:
        assert et.load_bundle(device).head_version == decision["version"]
