"""One poisoned device in an 8-device fleet round: accuracy on unseen rows of the merged head with
the leave-one-device-out label check, of the honest 7-device merge, and of the merge with the check
off. Engine-free, synthetic backbone-like features (the fleet unit tests' generator); seconds.

    PYTHONPATH=.:src .venv/bin/python benchmarks/fleet_poisoning.py   # it reuses the fleet tests' generator
"""

from __future__ import annotations

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np

import edgetl.fleet.merger as M
from tests.fleet.test_poisoning import NAMES, _accuracy, _poisoned, _split, _two_class_devices

_provenance.stamp()

SEEDS = 5

for kind in ("ridge", "prototype"):
    rows = []
    for seed in range(SEEDS):
        (X, y), (Xt, yt) = _split(seed)
        parts, _ = _two_class_devices(X, y, devices=8, seed=seed)
        liar = sorted(parts)[(seed + 3) % 8]
        checked = M.run_local(M.Merger(kind, labels=NAMES), _poisoned(parts, liar))
        honest = M.run_local(M.Merger(kind, labels=NAMES), {k: v for k, v in parts.items() if k != liar})
        M.MIN_AGREEMENT = -1.0  # the check off
        unchecked = M.run_local(M.Merger(kind, labels=NAMES), _poisoned(parts, liar))
        M.MIN_AGREEMENT = 0.5
        named = {r["device"] for r in checked.provenance["refused"]} == {liar}
        rows.append(
            (_accuracy(checked.head, Xt, yt), _accuracy(honest.head, Xt, yt), _accuracy(unchecked.head, Xt, yt), named)
        )
    a = np.array([r[:3] for r in rows])
    print(
        f"{kind:9s} over {SEEDS} seeds: honest 7-device {a[:, 1].mean():.1f} +- {a[:, 1].std():.1f} %, "
        f"checked 8-device {a[:, 0].mean():.1f} +- {a[:, 0].std():.1f} "
        f"% (|diff| max {np.abs(a[:, 0] - a[:, 1]).max():.2f} pt), "
        f"unchecked {a[:, 2].mean():.1f} +- {a[:, 2].std():.1f} %; "
        f"poisoned device named {sum(r[3] for r in rows)}/{SEEDS}"
    )
