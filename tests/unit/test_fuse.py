"""The fused-model parity gate: a single-file model that disagrees with backbone + head is refused."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.core.fuse import PARITY_TOLERANCE, check_parity, parity
from edgetl.errors import GateError


def test_parity_gate_passes_rounding_and_refuses_a_wrong_graph():
    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    close = parity(ref + 1e-6, ref)
    check_parity(close, close["max_abs_diff"], "max probability difference", allow=False)
    assert close["passed"] and close["top1_agreement"] == 1.0
    wrong = parity(ref[:, ::-1], ref)
    with pytest.raises(GateError, match="disagrees with backbone"):
        check_parity(wrong, wrong["max_abs_diff"], "max probability difference", allow=False)
    check_parity(wrong, wrong["max_abs_diff"], "max probability difference", allow=True)  # --allow-drop
    assert wrong["passed"] is False and wrong["max_abs_diff"] > PARITY_TOLERANCE
