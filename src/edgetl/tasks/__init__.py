"""The task registry: every task edgetl can fit, predict and update, by name.

``get(name)`` returns a task; ``for_data(path, ...)`` finds the task a dataset is for (an explicit
``--task`` or ``--head`` first, then the data's shape: text files, good-only folders, labelled
image folders); ``for_bundle(bundle)`` reads it from the manifest. Adding a task is adding a
package here with a :class:`edgetl.tasks.base.Task` subclass and one entry in :data:`TASKS`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BundleError, ConfigError
from .anomaly.task import ANOMALY
from .base import Task
from .classify.task import ImageClassifyTask
from .text.task import TextTask

# Detection order matters: text files, then good-only folders, then labelled image folders.
TASKS: dict[str, Task] = {t.name: t for t in (TextTask(), ANOMALY, ImageClassifyTask())}


def get(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ConfigError: unknown task (the message lists the known ones).
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; edgetl has {', '.join(TASKS)}") from None


def for_data(data: str | Path, *, task: str | None = None, head: str | None = None) -> Task:
    """The task for fitting ``data``: ``task`` if given, else the one whose heads include ``head``,
    else the first that claims the data.

    Raises:
        ConfigError: unknown task, or a head the chosen task does not have.
    """
    if task is not None:
        chosen = get(task)
        if head is not None and head not in chosen.head_kinds:
            owners = sorted(t.name for t in TASKS.values() if head in t.head_kinds)
            hint = f"; --head {head} is for --task {' or '.join(owners)}" if owners else ""
            raise ConfigError(f"--task {task} takes --head {' | '.join(chosen.head_kinds)}{hint}")
        return chosen
    if head is not None:
        having = [t for t in TASKS.values() if head in t.head_kinds]
        claimers = [t for t in having if t.claims(Path(data))]
        if having:
            return (claimers or having)[0]
    return next((t for t in TASKS.values() if t.claims(Path(data))), TASKS["classify"])


def for_bundle(bundle, where: str | Path | None = None) -> Task:
    """The task a bundle (or its manifest) was made by.

    Raises:
        BundleError: a task this edgetl does not know.
    """
    manifest = bundle.manifest if hasattr(bundle, "manifest") else bundle
    name = manifest.get("task", "classify")
    if name not in TASKS:
        raise BundleError(f"bundle task {name!r} is not one this edgetl knows ({', '.join(TASKS)}); upgrade edgetl")
    # The manifest's task decides which code reads the bundle, so it must match what the bundle holds.
    problem = TASKS[name].manifest_problem(manifest)
    if problem:
        where = where or (Path(bundle.path) / "manifest.json" if hasattr(bundle, "path") else "manifest")
        raise BundleError(f"{where}: {problem}; the manifest does not describe this bundle, copy it again")
    return TASKS[name]
