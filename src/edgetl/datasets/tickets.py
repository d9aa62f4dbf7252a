"""A built-in text example: maintenance tickets in five classes, written from templates, seeded.

Each class has its own vocabulary (parts, fluids, symptoms) filled into sentence templates, with
shared noise around it (machine names, who reports, when, how urgent, casing). Honesty of the
validation split: the validation rows come from *held-out templates* -- phrasings never seen in
training -- so a head that only memorised sentence shapes would fail there; the vocabulary of a
class is shared between the splits, as it is between real tickets about the same fault.

Classes: ``electrical``, ``leak``, ``noise_vibration``, ``overheating``, ``software``.

Example:
    >>> summary = make_tickets("data/tickets", seed=0)  # doctest: +SKIP
    >>> summary["counts"]["leak"]  # doctest: +SKIP
    {'train': 60, 'val': 20}

Command line: ``edgetl example tickets OUT_DIR [--seed N]`` writes ``OUT_DIR/tickets.csv``.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from ..errors import DataError

ASSETS = [
    "press 4",
    "conveyor B",
    "pump P-12",
    "CNC lathe 7",
    "packaging line 2",
    "compressor C3",
    "robot cell 5",
    "mixer M1",
    "extruder 2",
    "palletizer",
    "filler 6",
    "boiler feed pump",
    "saw station",
    "oven line 1",
]
PREFIXES = ["", "", "Operator reports", "Tech note:", "Shift lead:", "Night shift:", "FYI", "Maintenance request -"]
TIMES = [
    "",
    "",
    "this morning",
    "during night shift",
    "since Monday",
    "after the restart",
    "again today",
    "at the start of the shift",
    "twice this week",
]
SUFFIXES = [
    "",
    "",
    "",
    " - urgent",
    ", please check",
    ". Recurring issue.",
    ", production slowed",
    " (ticket reopened)",
]

VOCAB = {
    "leak": {
        "fluid": ["oil", "hydraulic fluid", "coolant", "water", "lubricant", "grease", "glycol"],
        "part": ["seal", "hose", "fitting", "gasket", "valve", "pipe joint", "reservoir", "cylinder rod seal"],
        "verb": ["leaking", "dripping", "seeping", "weeping"],
        "puddle": ["puddle", "pool", "big stain", "full drip tray", "wet patch"],
        "noun": ["leak", "seepage", "drip"],
    },
    "electrical": {
        "part": [
            "breaker",
            "fuse",
            "contactor",
            "power supply",
            "supply cable",
            "motor starter",
            "terminal block",
            "relay",
            "main isolator",
        ],
        "symptom": ["tripped", "blew", "burnt out", "shorted", "keeps cutting out", "failed"],
    },
    "overheating": {
        "part": [
            "motor",
            "bearing housing",
            "gearbox",
            "spindle",
            "hydraulic unit",
            "drive",
            "heat exchanger",
            "pump motor",
        ],
        "hot": ["running hot", "overheating", "too hot to touch", "way above normal temperature", "getting very hot"],
        "cause": [
            "cooling fan stopped",
            "air filter blocked",
            "low coolant flow",
            "radiator clogged with dust",
            "ventilation duct obstructed",
            "thermostat stuck",
        ],
        "deg": ["85", "92", "110", "97", "120"],
    },
    "noise_vibration": {
        "noise": ["grinding", "squealing", "rattling", "knocking", "clunking", "screeching", "whining"],
        "part": ["belt", "chain", "gearbox", "fan", "roller", "coupling", "idler pulley", "bearing"],
        "vib": ["vibrating heavily", "shaking", "wobbling", "vibrating badly"],
    },
    "software": {
        "thing": [
            "HMI",
            "PLC program",
            "touch screen",
            "SCADA client",
            "scanner software",
            "label printer driver",
            "recipe manager",
            "operator panel",
        ],
        "symptom": [
            "froze",
            "crashed",
            "shows an error code",
            "won't boot",
            "lost connection to the server",
            "keeps rebooting",
            "hangs",
        ],
        "action": ["restarted it", "reinstalled the update", "cleared the cache", "power cycled the panel"],
        "num": ["102", "417", "23", "5001", "88"],
    },
}

TRAIN_TEMPLATES = {
    "leak": [
        "{prefix} {fluid} {verb} from the {part} on {asset} {time}",
        "found a {puddle} of {fluid} under {asset}, looks like the {part} is worn",
        "{asset}: {part} {verb} {fluid}, topped up the reservoir",
        "{fluid} level dropping on {asset}, traced it to a loose {part}",
        "replace {part} on {asset}, constant {fluid} {noun}",
        "{asset} losing {fluid} {time}, {part} cracked",
    ],
    "electrical": [
        "{prefix} {part} {symptom} on {asset} {time}",
        "{asset} has no power, main {part} {symptom}",
        "saw sparks coming from the {part} in the control cabinet of {asset}",
        "earth fault alarm on {asset}, {part} needs checking",
        "{asset} {time}: voltage drop whenever the {part} engages",
        "rewire the {part} on {asset}, insulation damaged",
    ],
    "overheating": [
        "{prefix} {part} on {asset} is {hot} {time}",
        "temperature alarm on {asset}, {part} reading {deg} degrees",
        "{asset} {part} {hot}, {cause}",
        "had to let {asset} cool down, {part} {hot}",
        "high temp warning for the {part} of {asset}",
        "{cause} on {asset}, {part} temperature climbing",
    ],
    "noise_vibration": [
        "{prefix} {noise} noise from the {part} on {asset} {time}",
        "{asset} {vib} when running at full speed",
        "loud {noise} coming from {asset}, probably the {part}",
        "{part} on {asset} {noise}, needs alignment",
        "excessive vibration on {asset} near the {part}",
        "{asset} makes a {noise} sound at startup",
    ],
    "software": [
        "{prefix} {thing} on {asset} {symptom} {time}",
        "{thing} {symptom}, operators cannot load the recipe",
        "after the firmware update the {thing} of {asset} {symptom}",
        "{asset}: {thing} {symptom}; {action} but the problem persists",
        "cannot log in to the {thing} on {asset}",
        "{thing} displays error code E{num} on {asset}",
    ],
}

# Phrasings that appear only in validation.
VAL_TEMPLATES = {
    "leak": [
        "there is {fluid} all over the floor next to {asset}; the {part} won't seal",
        "{prefix} noticed {fluid} {noun} around the {part} of {asset}",
        "{asset} had to be stopped because the {part} was spraying {fluid}",
        "drip under {asset} again, {fluid} coming out of the {part}",
    ],
    "electrical": [
        "the {part} for {asset} {symptom} {time}, machine dead",
        "{prefix} electrician needed at {asset}: {part} {symptom} and power lost",
        "intermittent power loss on {asset}; suspect a loose wire at the {part}",
        "{asset} won't switch on, {part} {symptom}",
    ],
    "overheating": [
        "{part} of {asset} was {hot} again, thermal cutout kicked in",
        "{prefix} {asset} keeps shutting down on over-temperature; {cause}",
        "heat coming off the {part} on {asset} is abnormal, {deg}C measured",
        "{asset}: {cause}, so the {part} is overheating",
    ],
    "noise_vibration": [
        "{prefix} strange {noise} on {asset} {time}, {part} might be loose",
        "{asset} is {vib} and you can hear the {part} {noise}",
        "the {part} of {asset} has started {noise}",
        "vibration sensor on {asset} above limit, {part} suspected",
    ],
    "software": [
        "{prefix} the {thing} at {asset} is stuck on the loading screen",
        "{asset} {thing} {symptom} in the middle of a batch; {action}",
        "software problem on {asset}: {thing} {symptom}",
        "{thing} for {asset} lost its settings after a reboot",
    ],
}

CLASSES = sorted(VOCAB)


def _seen(words: list[str]) -> list[str]:
    """The part of a class's word list that training may use: the first two thirds."""
    return words[: max(1, -(-2 * len(words) // 3))]


def _fill(template: str, label: str, rng: random.Random, *, train: bool) -> str:
    slots = {"asset": rng.choice(ASSETS), "prefix": rng.choice(PREFIXES), "time": rng.choice(TIMES)}
    slots.update({k: rng.choice(_seen(v) if train else v) for k, v in VOCAB[label].items()})
    text = template.format(**slots)
    text = re.sub(r"\s+", " ", text).strip(" ,;:") + rng.choice(SUFFIXES)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.6:
        text = text[0].upper() + text[1:]
    return text


def _draw(templates: dict, n: int, rng: random.Random, taken: set, *, train: bool) -> list[tuple[str, str]]:
    rows = []
    for label in CLASSES:
        made = 0
        for _ in range(n * 50):
            if made == n:
                break
            text = _fill(rng.choice(templates[label]), label, rng, train=train)
            if text.lower() not in taken:
                taken.add(text.lower())
                rows.append((text, label))
                made += 1
    return rows


def make_tickets(
    out: str | Path, *, seed: int = 0, per_class: int = 60, val_per_class: int = 20, force: bool = False
) -> dict:
    """Write ``out/tickets.csv`` (columns text,label,split); returns a summary.

    Deterministic for a given seed (byte-identical files). Training rows use the training
    templates only, validation rows the held-out templates only, and no text appears twice.

    Raises:
        DataError: ``out/tickets.csv`` exists and ``force`` is not set.
    """
    out = Path(out)
    path = out / "tickets.csv"
    if path.exists() and not force:
        raise DataError(f"{path}: exists; pass force=True (--force) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    taken: set = set()
    train = _draw(TRAIN_TEMPLATES, per_class, rng, taken, train=True)
    val = _draw(VAL_TEMPLATES, val_per_class, rng, taken, train=False)
    rng.shuffle(train)
    rng.shuffle(val)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label", "split"])
        w.writerows([t, l, "train"] for t, l in train)
        w.writerows([t, l, "val"] for t, l in val)
    counts = {c: {"train": sum(l == c for _, l in train), "val": sum(l == c for _, l in val)} for c in CLASSES}
    return {
        "file": str(path),
        "classes": CLASSES,
        "counts": counts,
        "seed": seed,
        "templates": {"train": sum(map(len, TRAIN_TEMPLATES.values())), "val": sum(map(len, VAL_TEMPLATES.values()))},
    }
