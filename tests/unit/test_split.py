"""Splits that respect groups, and the leakage check that says when a split does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetl.core.diagnostics import near_duplicates
from edgetl.errors import DataError
from edgetl.tasks.classify.data import Sample, group_split, load_dataset
from tests.conftest import make_grouped_crops


def _samples(groups_per_class: dict[str, int], per_group: int = 5) -> list[Sample]:
    out = []
    for c, n in groups_per_class.items():
        for g in range(n):
            for i in range(per_group):
                out.append(Sample(Path(f"{c}/{g}/{i}.png"), c, f"{c}{g}{i}".ljust(64, "0"), f"{c}/{g}"))
    return out


def test_group_split_keeps_every_group_on_one_side_and_each_class_represented():
    samples = _samples({"a": 6, "b": 5, "c": 10})
    train, val, info = group_split(samples, fraction=0.2, seed=0)
    tr_groups, va_groups = {s.group for s in train}, {s.group for s in val}
    assert not tr_groups & va_groups
    assert len(train) + len(val) == len(samples)
    for c in "abc":  # every class in both, near the requested fraction
        n_val = sum(s.label == c for s in val)
        n_all = sum(s.label == c for s in samples)
        assert 1 <= n_val and n_val / n_all <= 0.4
    assert info["classes_without_val"] == [] and info["val_groups"] == len(va_groups)
    assert group_split(samples, fraction=0.2, seed=0) == (train, val, info)  # seeded: the same again
    assert group_split(samples, fraction=0.2, seed=1)[1] != val


def test_a_class_with_one_group_stays_in_training_and_is_reported():
    train, val, info = group_split(_samples({"a": 1, "b": 4}), fraction=0.25, seed=0)
    assert not any(s.label == "a" for s in val) and any(s.label == "a" for s in train)
    assert info["classes_without_val"] == ["a"]


def test_folder_groups_and_regex_groups(tmp_path):
    make_grouped_crops(tmp_path / "f", classes=("brick", "grass"), groups=4, per_group=3, size=32)
    ds = load_dataset(tmp_path / "f", val_split=0.25, seed=0)
    assert ds.split["method"] == "grouped" and ds.split["groups_from"].startswith("folder")
    assert not {s.group for s in ds.train} & {s.group for s in ds.val}
    flat = load_dataset(tmp_path / "f", val_split=0.25, seed=0, group_by="none")
    assert flat.split["method"] == "stratified"

    make_grouped_crops(tmp_path / "r", classes=("brick", "grass"), groups=4, per_group=3, size=32, folders=False)
    ds = load_dataset(tmp_path / "r", val_split=0.25, seed=0, group_by=r"regex:^(part\d+)_")
    assert ds.split["method"] == "grouped" and ds.split["groups"] == 8
    assert not {s.group for s in ds.train} & {s.group for s in ds.val}
    with pytest.raises(DataError, match="needs a CSV"):
        load_dataset(tmp_path / "r", group_by="camera")
    with pytest.raises(DataError, match="regular expression"):
        load_dataset(tmp_path / "r", group_by="regex:(")


def test_csv_group_column(tmp_path):
    make_grouped_crops(tmp_path, classes=("brick", "grass"), groups=4, per_group=3, size=32, folders=False)
    rows = ["path,label,camera"] + [
        f"{p.relative_to(tmp_path)},{p.parent.name},{p.name.split('_')[0]}" for p in sorted(tmp_path.rglob("*.png"))
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "labels.csv", val_split=0.25, seed=0, group_by="camera")
    assert ds.split["method"] == "grouped"
    assert not {s.group for s in ds.train} & {s.group for s in ds.val}
    with pytest.raises(DataError, match="no column 'site'"):
        load_dataset(tmp_path / "labels.csv", group_by="site")


def test_near_duplicates_on_constructed_features():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(100, 32)).astype(np.float32)
    copies = T[:20] + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    fresh = rng.normal(size=(20, 32)).astype(np.float32)
    leak = near_duplicates(T, copies)
    assert leak["fraction"] == 1.0 and leak["warn"] and len(leak["examples"]) == 3
    assert near_duplicates(T, fresh)["near_copies"] == 0
    assert not near_duplicates(T, np.concatenate([fresh[:18], copies[:2]]))["warn"]  # 10 %: no warning
