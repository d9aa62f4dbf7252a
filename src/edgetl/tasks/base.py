"""The Task protocol: what differs between classifying images, classifying text and finding defects.

One ``fit`` (:mod:`edgetl.pipeline.fit`), one retarget, one predictor loader, one ``adapt`` /
``history`` / ``rollback`` / ``threshold`` (:mod:`edgetl.device`), one gate and one fuse writer
serve every task. A task is a small package under :mod:`edgetl.tasks` whose :class:`Task` object
supplies only what is its own:

* **data**: which inputs it claims (:meth:`Task.claims`), how they are found, checked and split
  (:meth:`Task.load_data`);
* **backbone**: which export of the backbone it reads (:attr:`Task.backbone_kind`), how its
  inputs become that model's inputs (:meth:`Task.extractor`), what calibrates INT8
  (:meth:`Task.calibration`), profile adjustments (:meth:`Task.prepare_target`);
* **head**: training and evaluation on features (:meth:`Task.train`), the gate's evidence
  (:meth:`Task.gate`), and what a bundle carries besides the backbone and the head
  (:meth:`Task.write_release`); a head saves itself and gives the graph fused behind the backbone
  (``head.save(path)``, ``head.graph(opset, ir_version)``);
* **device**: the predictor (:meth:`Task.predictor`), the on-device update (:meth:`Task.adapt`),
  its thresholds, and how results read as text (``render_*``);
* **the layers above** (serve, report, fleet, the pipeline's checks): what differs by task is a
  property or hook of the task (:attr:`Task.gate_metric`, :attr:`Task.one_class`,
  :attr:`Task.reads_texts`, :meth:`Task.review_need`, :meth:`Task.report_data` ...), never a
  comparison with its name: a task is one package, and a new one needs no branch elsewhere
  (``tests/unit/test_no_task_branches.py`` holds every module outside this package to that).

:class:`Task` is abstract: what every task must supply is an abstract method, and what only some
tasks have (a classifier's items and features for drift, the accuracy-control score) is declared
here with an error saying which task lacks it, so the upper layers call only what ``Task`` declares.

Tasks import the core and the heads, never the laptop side (:mod:`edgetl.pipeline`,
:mod:`edgetl.export`): the device loads them.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.backbone import IMAGE, TEXT
from ..core.bundle import Bundle
from ..errors import ConfigError


@dataclass(frozen=True)
class Calibration:
    """What calibrates INT8: ``key`` (a content hash: the model cache's key), ``load()`` (the
    inputs, only on a cache miss), ``info`` (for the report)."""

    key: str
    load: Callable[[], Any]
    info: dict
    count: int


@dataclass
class Trained:
    """A head trained on one model's features, with what the rest of fit needs.

    Attributes:
        head: the trained head.
        metrics: the task's figures on its evaluation items (validation, or the labelled test set).
        outcome: the per-item evidence the gate pairs with the reference's (correctness, or
            labels and scores).
        train_metrics: figures on the training items.
        backbone_runs: items that went through the backbone (cache misses).
        session: the session the features came from (latency, parity).
        features: task-specific arrays kept for the bundle (exemplars, leakage check).
    """

    head: Any
    metrics: dict
    outcome: Any
    train_metrics: dict = field(default_factory=dict)
    backbone_runs: int = 0
    session: Any = None
    features: dict = field(default_factory=dict)


@dataclass
class AdaptResult:
    """What an on-device update did; ``accepted`` is False only for a dry run."""

    bundle: Bundle
    version: int
    summary: dict
    timings: dict
    skipped: list
    accepted: bool = True

    def to_dict(self) -> dict:
        return {
            "bundle": str(self.bundle.path),
            "task": self.bundle.task,
            "version": self.version,
            **self.summary,
            "timings_s": self.timings,
            "accepted": self.accepted,
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
        }


def stratified_subset(labels: Iterable[str], *, size: int, seed: int) -> list[int]:
    """Indices of a class-stratified subset of at most ``size`` items.

    Round-robin over classes (in a seeded order within each class) so a rare class still shapes
    the activation ranges; with fewer items than ``size`` every item is used.
    """
    labels = list(labels)
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, lbl in enumerate(labels):
        by_class.setdefault(lbl, []).append(i)
    queues = [list(rng.permutation(v)) for _, v in sorted(by_class.items())]
    picked: list[int] = []
    while len(picked) < min(size, len(labels)):
        for qu in queues:
            if qu and len(picked) < size:
                picked.append(int(qu.pop()))
    return sorted(picked)


def coerce_head_config(head, config_cls, default_kind: str, kinds: Iterable[str]):
    """What a caller gave for ``head`` (a config, a kind name, a dict of settings or None) as a
    ``config_cls``; a dict's ``None`` values mean "the default", as unset CLI options do."""
    if isinstance(head, config_cls):
        return head
    if head is None or isinstance(head, str):
        return config_cls(kind=head or default_kind)
    if isinstance(head, dict):
        return config_cls.from_dict({"kind": default_kind, **{k: v for k, v in head.items() if v is not None}})
    raise ConfigError(f"head {head!r}: give a {config_cls.__name__}, a kind ({', '.join(kinds)}) or a dict")


def digest_of(parts: Iterable[str]) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class Task(abc.ABC):
    """The base every task extends; see the module docstring for what each part is for."""

    name: str = ""
    items: str = "images"  # what the task's inputs are called in messages
    backbone_kind: str = "image"  # which export of the backbone: image | image-patch | text
    default_target: str = "openvino-cpu"
    head_kinds: tuple[str, ...] = ()
    # Kinds a saved head version may carry beyond those --head asks for (a selection's outcome).
    stored_head_kinds: tuple[str, ...] = ()
    backbone_fields: tuple[str, ...] = ()  # manifest backbone fields this task's device code reads
    # predict options this task takes (the CLI refuses the others for its bundles)
    predict_options: frozenset[str] = frozenset()
    # the manifest's thresholds key and the version entry's field, with what they mean
    threshold_key: str = ""
    threshold_field: str = ""
    accuracy_control: bool = False
    # The figure the conversion gate compares (the fit's gate records it even when the shipped model
    # is its own reference and nothing is compared); every task sets it.
    gate_metric: str = ""
    # What the layers above ask instead of the task's name:
    # answers are good / defect verdicts on a score against one threshold (learned from good items
    # only): no classes to add, a heat map per answer, an update that learns from good items alone.
    one_class: bool = False
    # the labels every bundle of the task has (a one-class task's verdicts); empty: the data's classes
    fixed_labels: tuple[str, ...] = ()
    # the key naming an item in predictions and galleries (a file's path, or the text itself)
    item_key: str = "path"
    # whether fit looks for near-duplicates across its split (the trained features carry the split's
    # feature rows: ``X_tr``, ``X_va``, ``n_train`` and the fold ``plan``)
    leakage_check: bool = False
    # whether ``--backbone auto`` can rank backbones on this task's data
    ranks_backbones: bool = False
    # the report: where a bundle's report.json keeps the fit's figures, the ones its summary shows,
    # and what its threshold card is called
    recorded_metrics: str = "val"
    summary_metrics: tuple[str, ...] = ("accuracy", "balanced_accuracy", "n")
    threshold_title: str = "unknown threshold"

    def __init__(self) -> None:
        # Without these a task would register under an empty name, or its gate would record no metric.
        missing = [k for k in ("name", "gate_metric") if not getattr(self, k)]
        if missing:
            raise TypeError(f"{type(self).__name__} must set {' and '.join(missing)}")

    @property
    def reads_texts(self) -> bool:
        """Whether the task's inputs are texts (a tokenizer feeds the backbone) rather than images."""
        return self.backbone_kind == TEXT

    @property
    def backbone_family(self) -> str:
        """Which of the backbone registry's families this task picks from: ``image`` or ``text``
        (a patch-feature backbone is an image backbone read another way)."""
        return TEXT if self.reads_texts else IMAGE

    # ---- data ----------------------------------------------------------------------------
    @abc.abstractmethod
    def claims(self, data: Path) -> bool:
        """Whether ``data`` looks like this task's (automatic task detection)."""
        return False

    @abc.abstractmethod
    def load_data(self, data: Path, options, cache_root: Path):
        raise NotImplementedError

    @abc.abstractmethod
    def head_config(self, head):
        """A validated head configuration from a config object, a dict, a kind name or None."""
        raise NotImplementedError

    def recorded_head(self, bundle: Bundle, head: dict):
        """The head settings a bundle records, as a re-export should train them again."""
        return self.head_config(head)

    # ---- backbone ------------------------------------------------------------------------
    def prepare_target(self, target):
        """The profile as this task uses it (e.g. a float tail the scoring graph needs)."""
        return target

    def backbone_view(self, exported):
        """The exported backbone as this task feeds it (e.g. another preprocessing)."""
        return exported

    @abc.abstractmethod
    def extractor(
        self,
        model: Path,
        exported,
        *,
        runtime: str,
        device: str,
        providers,
        simulate: bool = False,
        float_precision: str = "f32",
        threads: int | None = None,
    ):
        raise NotImplementedError

    @abc.abstractmethod
    def calibration(self, data, target, exported, seed: int) -> Calibration:
        raise NotImplementedError

    # ---- heads ---------------------------------------------------------------------------
    @abc.abstractmethod
    def train(self, extractor, data, options, cache, *, like: Trained | None = None) -> Trained:
        """Features of every item through ``extractor`` (cached), then the head and its figures.
        ``like``: train the FP32 reference with the settings ``like`` chose (its L2)."""
        raise NotImplementedError

    @abc.abstractmethod
    def gate(self, trained: Trained, reference: Trained, tolerance_pp: float):
        """-> (the reference figures for the report, the :class:`GateDecision`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def write_release(self, folder: Path, trained: Trained, data, options, exported) -> dict:
        """Write the task's files beside head v1 into a bundle being staged; returns
        ``{"entry": ..., "manifest": ..., "report": ...}`` additions."""
        raise NotImplementedError

    @abc.abstractmethod
    def parity(self, fused_session, trained: Trained, data, exported) -> tuple[dict, float, str]:
        raise NotImplementedError

    # ---- device --------------------------------------------------------------------------
    @abc.abstractmethod
    def predictor(
        self, bundle: Bundle, *, device: str | None = None, threads: int | None = None, head_version: int | None = None
    ):
        raise NotImplementedError

    @abc.abstractmethod
    def adapt(self, b: Bundle, data, **options) -> AdaptResult:
        raise NotImplementedError

    @abc.abstractmethod
    def check_threshold(self, value) -> float:
        raise NotImplementedError

    def fused_meta(self, b: Bundle, head) -> dict:
        return {
            "backbone": b.manifest["backbone"]["name"],
            "preprocess": b.manifest["backbone"]["preprocess"],
            "precision": b.precision,
            "task": self.name,
        }

    def manifest_problem(self, manifest: dict) -> str | None:
        """Why a (schema-checked) manifest cannot be a bundle of this task, or None: its backbone
        and head kinds must be this task's, and the backbone fields the task reads present."""
        backbone = manifest.get("backbone", {})
        want = "text" if self.backbone_kind == "text" else "image"
        kind = backbone.get("kind", self.backbone_kind)
        pre_kind = "text" if backbone.get("preprocess", {}).get("kind") == "text" else "image"
        if kind != self.backbone_kind or pre_kind != want:
            return (
                f"task {self.name!r} needs an {self.backbone_kind} backbone, and this bundle's is an {kind} one "
                f"({pre_kind} inputs)"
            )
        for key in self.backbone_fields:
            if key not in backbone:
                return f"task {self.name!r} needs backbone.{key}, which this bundle lacks"
        kinds = (*self.head_kinds, *self.stored_head_kinds)
        for e in manifest.get("head", {}).get("versions", []):
            if self.head_kinds and e.get("kind") is not None and e["kind"] not in kinds:
                return (
                    f"head version {e.get('version')} is a {e['kind']!r} head, not one of task {self.name!r}'s "
                    f"({', '.join(kinds)})"
                )
        return None

    @abc.abstractmethod
    def load_head(self, path: Path):
        raise NotImplementedError

    def bench_input(self, bundle: Bundle, session, n: int):
        """A batch of ``n`` inputs for timing the bundle's single-file model (random images)."""
        size = int(bundle.manifest["backbone"]["preprocess"]["input_size"])
        return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)

    def transfer_check(self, trained: Trained, data, exported, cache_root: Path) -> dict | None:
        """Does the pretrained backbone beat a baseline with no pretraining on the same split?
        (:mod:`edgetl.transfer.negative`); None where the task has no such baseline."""
        return None

    def speed(self, shipped, reference, data) -> dict:
        """Report figures of speed beyond the batch-1 latencies fit measures for image models."""
        return {}

    # ---- what only some tasks have ------------------------------------------------------------
    # Declared here so the device, the pipeline and the report call only what Task declares; a task
    # without the capability says so in one line (its flags keep the callers from asking).
    def _lacks(self, what: str):
        return NotImplementedError(f"the {self.name} task has no {what}")

    def features(
        self,
        extractor,
        items: Sequence,
        *,
        cache=None,
        view: int = 0,
        quiet: bool = True,
        desc: str = "features",
        skipped: list | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Pooled features of ``items`` through ``extractor`` (drift compares them with the
        training features)."""
        raise self._lacks("pooled features of its items")

    def scan(self, data, *, bundle=None, strict: bool = False, group_by: str | None = None) -> tuple[list, list]:
        """Labelled items of ``data`` for eval, drift and adapt: (items, skipped)."""
        raise self._lacks("labelled-item scan")

    def predict_items(self, inputs: Sequence) -> list:
        """The items of files and folders given to predict (drift on unlabelled images)."""
        raise self._lacks("item listing")

    def accuracy_score(self, reference: Trained, data):
        """What accuracy control maximises, from a converted model's outputs (only tasks with
        :attr:`accuracy_control`)."""
        raise self._lacks("accuracy control")

    # ---- the layers above: serving and the report ------------------------------------------------
    def review_need(self, result: dict) -> float:
        """How much an answer needs a person (the review queue serves the highest first).

        Classes: 1 - confidence, plus 1 when the input is out of distribution (drift), so drifted
        inputs come first and then the least confident."""
        value = 1.0 - float(result.get("confidence", 1.0))
        if result.get("ood"):
            value += 1.0
        return round(value, 6)

    def report_data(self, data):
        """What the report of a bundle fit has just written is evaluated on, from the fit's data:
        its held-out items, or None (the report then shows what the bundle recorded)."""
        return list(data.val) if getattr(data, "val", None) else None

    # ---- what fit prints -------------------------------------------------------------------
    # The report's feature-agreement figure, as the fit summary names it.
    cosine = ("feature cosine", "feature_cosine_mean")
    skipped_key = "path"

    def fit_summary(self, result) -> dict:
        """The ``--json`` object of ``fit`` / ``export``: the bundle, data, figures, gate, speed."""
        r = result.report
        shared = (
            "target",
            "precision",
            "runtime",
            "conversion",
            "reference",
            "gate",
            "fused_parity",
            "latency_batch1",
            "fused_latency_batch1",
            "size",
            "backbone_choice",
            "transfer_check",
        )
        return {
            "bundle": str(result.bundle.path),
            "task": self.name,
            "labels": result.bundle.labels,
            "counts": result.data.counts(),
            "skipped": [{self.skipped_key: str(p), "reason": why} for p, why in result.data.skipped],
            **self.fit_figures(result),
            **{k: r[k] for k in shared if k in r},
            "timings_s": result.timings,
        }

    def fit_figures(self, result) -> dict:
        return {}

    def render_fit(self, result) -> str:
        """What ``fit`` prints for people: where the bundle is, the data, the gate, speed, time."""
        from ..core.metrics import gate_lines

        r = result.report
        lines = [f"bundle    {result.bundle.path}  ({self.name}; {r['target']}: {r['precision']} on {r['runtime']})"]
        if r.get("backbone_choice"):
            lines.append(f"backbone  {r['backbone_choice']['reason']}")
        lines += self.fit_lines(result)
        lines += gate_lines(r, self.cosine[0], r["reference"].get(self.cosine[1]))
        lines.append(f"model     {self.model_line(result)}")
        runs = {k: v for k, v in result.timings.items() if k.startswith("backbone_")}
        count = next(iter(runs.values()), 0)
        lines.append(
            f"time      {sum(v for k, v in result.timings.items() if k not in runs):.1f} s "
            f"({count} {self.items} through a backbone)"
        )
        return "\n".join(lines + self.fit_tail(result))

    def fit_lines(self, result) -> list[str]:
        return []

    def model_line(self, result) -> str:
        r = result.report
        return (
            f"{r['size']['backbone_bytes'] / 1e6:.1f} MB backbone, batch-1 latency "
            f"{r['latency_batch1']['p50_ms']:.1f} ms (p50, this machine)"
        )

    def fit_tail(self, result) -> list[str]:
        return []

    # ---- text for people -------------------------------------------------------------------
    @abc.abstractmethod
    def render_predictions(self, predictions) -> str:
        raise NotImplementedError

    @abc.abstractmethod
    def render_metrics(self, metrics: dict, title: str = "") -> str:
        raise NotImplementedError

    @abc.abstractmethod
    def render_adapt(self, result: AdaptResult, dry_run: bool) -> str:
        raise NotImplementedError

    @abc.abstractmethod
    def render_history(self, rows: list[dict]) -> str:
        raise NotImplementedError

    @abc.abstractmethod
    def render_threshold(self, value: float, version: int, where: str) -> str:
        raise NotImplementedError

    def gather_inputs(self, args: list, *, file=None) -> list:
        """What ``predict`` was given to answer for: files and folders (text tasks read texts)."""
        from ..errors import DataError

        if not args:
            raise DataError(f"give one or more {self.items[:-1]} files or folders")
        return list(args)
