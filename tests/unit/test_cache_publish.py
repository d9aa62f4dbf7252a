"""Cache entries (exported backbones, converted models) are built in a private folder and
published by one rename, so two processes filling the same entry at once never share a folder and
a reader never sees an entry deleted or half-replaced under it."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from edgetl.core.features import publish_dir, staging_dir


def test_each_writer_stages_privately_and_the_first_to_publish_wins(tmp_path):
    folder = tmp_path / "models" / "abc"
    folder.parent.mkdir()
    a, b = staging_dir(folder), staging_dir(folder)
    assert a != b and a.parent == b.parent == folder.parent and a.name.startswith(".")
    for tmp, text in ((a, "first"), (b, "second")):
        tmp.mkdir()
        (tmp / "info.json").write_text(text)
    assert publish_dir(a, folder, "info.json") is True
    assert publish_dir(b, folder, "info.json") is False  # the same key: theirs is kept, ours removed
    assert (folder / "info.json").read_text() == "first"
    assert not a.exists() and not b.exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["abc"]


def _race(folder: str, text: str, start) -> bool:
    start.wait()
    tmp = staging_dir(Path(folder))
    tmp.mkdir()
    for i in range(50):
        (tmp / f"part{i}").write_text(text)
    (tmp / "info.json").write_text(text)
    return publish_dir(tmp, Path(folder), "info.json")


def test_writers_racing_for_one_entry_leave_one_complete_folder(tmp_path):
    folder = tmp_path / "entry"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as m:
        start = m.Event()
        with ctx.Pool(4) as pool:
            res = [pool.apply_async(_race, (str(folder), f"w{i}", start)) for i in range(4)]
            start.set()
            won = [r.get(timeout=60) for r in res]
    assert won.count(True) == 1
    text = (folder / "info.json").read_text()
    assert {p.read_text() for p in folder.glob("part*")} == {text}  # one writer's files, all of them
    assert len(list(folder.glob("part*"))) == 50
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_an_entry_without_its_marker_is_replaced(tmp_path):
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "model.onnx").write_text("half of an old write")  # no info.json: never completed
    tmp = staging_dir(folder)
    tmp.mkdir()
    (tmp / "info.json").write_text("new")
    assert publish_dir(tmp, folder, "info.json") is True
    assert sorted(p.name for p in folder.iterdir()) == ["info.json"]
