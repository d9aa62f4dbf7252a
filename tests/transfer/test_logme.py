"""LogME against a direct numerical evidence computation (scipy optimisation of the marginal likelihood)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetl.transfer.evidence import log_evidence, logme

optimize = pytest.importorskip("scipy.optimize")


def _direct(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I / beta + F F^T / alpha): the evidence with the weights integrated out."""
    n = F.shape[0]
    C = np.eye(n) / beta + F @ F.T / alpha
    _, logdet = np.linalg.slogdet(C)
    return -0.5 * (logdet + y @ np.linalg.solve(C, y) + n * math.log(2 * math.pi))


def _tolerance(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """How far two correct evaluations of the log-evidence may differ in floating point: the log-
    determinant and the quadratic form y^T C^-1 y are each computed to about eps * cond(C), relative
    to n (the log-determinant's terms) and to beta ||y||^2 (||C^-1|| <= beta). Where the targets are
    interpolated (n <= d), beta runs to 1e8 and the quadratic form is a difference of near-equal
    numbers scaled by beta: the bound grows with it, as the computation's own error does."""
    n = F.shape[0]
    C = np.eye(n) / beta + F @ F.T / alpha
    return 16 * np.finfo(float).eps * np.linalg.cond(C) * (n + beta * float(y @ y))


def _direct_max(F: np.ndarray, y: np.ndarray) -> float:
    best = None
    for start in ((0.0, 0.0), (2.0, -1.0), (-2.0, 1.0), (4.0, 2.0)):
        res = optimize.minimize(
            lambda t: -_direct(F, y, *np.exp(t)),
            start,
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 10000},
        )
        best = res.fun if best is None else min(best, res.fun)
    return -best


def _problem(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    F = rng.normal(size=(n, d)) + 0.8 * np.eye(3)[y] @ rng.normal(size=(3, d))
    return F, y


@pytest.mark.parametrize("n,d", [(40, 6), (12, 20)])  # covariance path (n > d) and Gram path (n <= d)
def test_logme_is_the_maximised_evidence(n, d):
    F, y = _problem(n, d, seed=n)
    r = logme(F, y)
    assert r.converged.all()
    for k in range(3):
        target = (y == k).astype(float)
        # the closed form on the spectrum equals the direct Gaussian log-density at LogME's (alpha, beta) ...
        assert r.per_target[k] * n == pytest.approx(
            _direct(F, target, r.alpha[k], r.beta[k]), abs=_tolerance(F, target, r.alpha[k], r.beta[k])
        )
        # ... and no (alpha, beta) found by a generic optimiser does better
        assert r.per_target[k] * n == pytest.approx(_direct_max(F, target), rel=1e-6, abs=1e-6)
    assert r.score == pytest.approx(r.per_target.mean())


def test_fixed_point_is_stationary():
    F, y = _problem(50, 8, seed=3)
    r = logme(F, y)
    target = (y == 0).astype(float)
    la, lb = math.log(r.alpha[0]), math.log(r.beta[0])
    h = 1e-5
    ga = (
        (_direct(F, target, math.exp(la + h), math.exp(lb)) - _direct(F, target, math.exp(la - h), math.exp(lb)))
        / 2
        / h
    )
    gb = (
        (_direct(F, target, math.exp(la), math.exp(lb + h)) - _direct(F, target, math.exp(la), math.exp(lb - h)))
        / 2
        / h
    )
    assert abs(ga) < 1e-4 and abs(gb) < 1e-4


def test_log_evidence_matches_direct_at_any_point():
    F, y = _problem(15, 9, seed=5)
    target = (y == 1).astype(float)
    w, U = np.linalg.eigh(F @ F.T)
    keep = w > 1e-10 * w.max()
    z = U[:, keep].T @ target
    for a, b in ((0.3, 2.0), (5.0, 0.1), (1.0, 1.0)):
        assert log_evidence(w[keep], z, float(target @ target), 15, 9, a, b) == pytest.approx(
            _direct(F, target, a, b), abs=_tolerance(F, target, a, b)
        )


def test_informative_features_score_higher():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    signal = np.eye(4)[y] * 2.0 + rng.normal(size=(120, 4))
    good = np.hstack([signal, rng.normal(size=(120, 60))])
    noise = rng.normal(size=(120, 64))
    weak = np.hstack([np.eye(4)[y] * 1.0 + rng.normal(size=(120, 4)), rng.normal(size=(120, 60))])
    s = [logme(X, y).score for X in (good, weak, noise)]
    assert s[0] > s[1] > s[2]


def test_float_targets_and_errors():
    rng = np.random.default_rng(1)
    F = rng.normal(size=(20, 5))
    Y = rng.normal(size=(20, 2))
    assert logme(F, Y).per_target.shape == (2,)
    with pytest.raises(ValueError):
        logme(F, np.zeros(19, int))
    with pytest.raises(ValueError):
        logme(np.full((20, 5), np.nan), np.zeros(20, int))
    with pytest.raises(ValueError):
        logme(F, rng.random(20))  # float 1-D labels are ambiguous
