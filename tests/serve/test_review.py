"""The review store: bounded, crash-safe (a process killed mid-write leaves whole items only), one
service per folder, and names that never come from a request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgetl.errors import ConfigError, DataError
from edgetl.serve.review import ReviewStore, StoreFull

IDS = [f"{i:016x}" for i in range(1, 40)]


def _put(store, k, size=1000, label="a", current=1):
    return store.put(
        IDS[k], os.urandom(size), label=label, suffix=".png", info={"predicted": label}, version=1, current=current
    )


def test_bounded_in_items_and_bytes_and_never_drops_unlearned_work(tmp_path):
    store = ReviewStore(tmp_path / "r", task="classify", max_items=3, max_bytes=10_000)
    for k in range(3):
        _put(store, k)
    with pytest.raises(StoreFull, match="no update has learned"):
        _put(store, 3)  # all three are a person's labels no update used: refuse, drop nothing
    assert len(store.index) == 3
    data, ids, _ = store.adapt_input(1)
    assert sorted(ids) == IDS[:3] and data.suffix == ".csv"
    store.mark_used(ids[:2], 2)  # an update (v2) learned from two of them
    _put(store, 3, current=2)  # v2 is live: room is made by dropping the oldest item it learned
    assert set(store.index) == {IDS[1], IDS[2], IDS[3]}
    assert not (store.items_dir / f"{IDS[0]}.png").exists() and not (store.items_dir / f"{IDS[0]}.json").exists()
    with pytest.raises(StoreFull, match="larger than"):
        store.put(IDS[9], b"x" * 20_000, label="a", suffix=".png", info={}, version=2, current=2)
    summary = store.summary(2)
    assert summary["items"] == 3 and summary["pending_total"] == 2 and summary["bytes"] <= 10_000
    assert store.summary(1)["pending_total"] == 3  # after a rollback to v1, what v2 learned is pending again
    store.close()


def test_one_service_per_folder_and_no_foreign_folder(tmp_path):
    store = ReviewStore(tmp_path / "r", task="classify")
    with pytest.raises(ConfigError, match="another edgetl serve"):
        ReviewStore(tmp_path / "r", task="classify")
    store.close()
    with pytest.raises(ConfigError, match="holds classify items"):
        ReviewStore(tmp_path / "r", task="anomaly")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("a user's file")
    with pytest.raises(ConfigError, match="not an edgetl review store"):
        ReviewStore(tmp_path / "mine", task="classify")
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "a user's file"  # untouched
    with pytest.raises(DataError):
        ReviewStore(tmp_path / "r", task="classify").put("../../etc/x", b"1", label="a", suffix="", info={}, version=1)


def test_leftovers_of_a_crash_are_cleaned_and_whole_items_kept(tmp_path):
    store = ReviewStore(tmp_path / "r", task="classify")
    for k in range(3):
        _put(store, k)
    store.close()
    items = tmp_path / "r" / "items"
    (items / f"{IDS[5]}.png").write_bytes(b"data written, record not yet")  # cut between the two renames
    (items / f".{IDS[6]}.png.tmp").write_bytes(b"half")  # cut before the rename
    (items / f"{IDS[2]}.json").write_text('{"id": "trunc')  # a damaged record
    reopened = ReviewStore(tmp_path / "r", task="classify")
    assert set(reopened.index) == set(IDS[:2])
    assert reopened.recovered == {"temporary": 1, "orphans": 2, "bad_records": 1}
    assert sorted(p.name for p in items.iterdir()) == sorted(f"{i}.{e}" for i in IDS[:2] for e in ("json", "png"))


_WRITER = """
import os, sys
from edgetl.serve.review import ReviewStore
store = ReviewStore(sys.argv[1], task="classify", max_items=100000, max_bytes=1 << 34)
print("ready", flush=True)
k = 0
while True:
    k += 1
    store.put(f"{k:016x}", os.urandom(200_000), label="a", suffix=".png", info={}, version=1)
"""


def test_a_writer_killed_mid_write_leaves_only_whole_items(tmp_path):
    root = tmp_path / "r"
    for delay in (0.3, 0.55):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        store = ReviewStore(root, task="classify")
        assert store.index, "the writer wrote nothing before it was killed"
        for meta in store.index.values():
            data = (store.items_dir / meta["file"]).read_bytes()
            assert len(data) == meta["bytes"] == 200_000
            assert json.loads((store.items_dir / f"{meta['id']}.json").read_text()) == meta
        names = {p.name for p in store.items_dir.iterdir()}
        assert names == {f"{i}.{e}" for i in store.index for e in ("json", "png")}
        store.close()
