"""Closed-form ridge classification from sufficient statistics, and a federated temperature fit.

Ridge regression of one-hot targets on standardised features, with an intercept, solved exactly
from raw moments: the row count ``N``, the feature sum ``s``, the Gram matrix ``G = X^T X`` and the
per-class counts ``n_c`` and sums ``S_c``. Sums of these over devices are the moments of the union
of their data, so a fleet merge is *the* central solution (Fed3R, Fiorellino et al., ICML 2024,
makes the same observation for a frozen feature extractor). The standardisation is part of the
merge: mean and scale come from the merged raw moments, and the centred scatter is formed from
them afterwards, never from per-device standardised features.

The result is edgetl's ``linear`` head (``mean``, ``scale``, ``W``, ``b``; logits =
``((x - mean) / scale) @ W + b``), so devices run it unchanged. Its penalty is chosen by
generalised cross-validation, which is itself a function of the moments only (so merged and
central picks agree), and the logits are scaled by a temperature fitted to the training rows'
leave-one-out cross-entropy (a one-dimensional convex problem that devices can evaluate on a grid; see
:func:`temperature_terms` / :func:`solve_temperature`).

Everything here is numpy in float64; nothing imports edgetl.
"""

from __future__ import annotations

import numpy as np

from ._edgetl import softmax

# log-spaced penalties (per row, on standardised features) searched by GCV
RIDGE_L2_GRID = tuple(float(v) for v in np.logspace(-5, 3, 33))
# bounds of the ridge temperature: ridge logits are regression outputs in about [0, 1]
RIDGE_T_BOUNDS = (1.0, 200.0)
# an absent class (no rows anywhere) sits this far below the lowest present bias: never predicted
ABSENT_MARGIN = 30.0


def standardisation(n: float, s: np.ndarray, sumsq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean float64, mean float32, scale float32) from the row count, feature sums and the sums
    of squares, with edgetl's rule for constant features (scale 1 when the standard deviation is
    below ``1e-6 * |mean|`` or ``1e-12``)."""
    mean64 = s / n
    var = np.maximum(sumsq / n - mean64 * mean64, 0.0)
    std = np.sqrt(var)
    varies = (std > 1e-6 * np.abs(mean64)) & (std > 1e-12)
    return mean64, mean64.astype(np.float32), np.where(varies, std, 1.0).astype(np.float32)


def ridge_from_moments(
    n: float,
    s: np.ndarray,
    gram: np.ndarray,
    counts: np.ndarray,
    class_sums: np.ndarray,
    *,
    l2: float | None = None,
    grid=RIDGE_L2_GRID,
) -> dict:
    """Solve the ridge classifier from raw moments.

    Args:
        n: number of rows.  s: (d,) feature sums.  gram: (d, d) ``X^T X``.
        counts: (k,) rows per class.  class_sums: (k, d) feature sums per class.
        l2: penalty per row (``(1/N) ||Y - XW - b||^2 + l2 ||W||^2``); None: chosen by GCV on ``grid``.

    Returns:
        dict with ``mean`` / ``scale`` (float32, d), ``W`` (d, k) and ``b`` (k,) in float64 (not yet
        temperature-scaled), ``l2``, ``gcv`` (the scores, or None) and ``present`` (bool, k).
    """
    n = float(n)
    s = np.asarray(s, np.float64)
    gram = np.asarray(gram, np.float64)
    counts = np.asarray(counts, np.float64)
    class_sums = np.asarray(class_sums, np.float64)
    mean64, mean32, scale32 = standardisation(n, s, np.diag(gram).copy())
    scale = scale32.astype(np.float64)
    scatter = gram - n * np.outer(mean64, mean64)  # sum over rows of (x - mu)(x - mu)^T
    scatter = 0.5 * (scatter + scatter.T)
    A = scatter / np.outer(scale, scale)
    B = (class_sums - counts[:, None] * mean64[None, :]).T / scale[:, None]  # (d, k): Xs_c^T Y_c
    evals, V = np.linalg.eigh(A)
    evals = np.maximum(evals, 0.0)
    Q = V.T @ B
    total = float(counts.sum() - np.sum(counts**2) / n)  # trace of the centred Y^T Y
    scores = None
    if l2 is None:
        scores = []
        for lam in grid:
            den = evals + n * lam
            rss = total - float(np.sum((Q * Q) * ((evals + 2 * n * lam) / den**2)[:, None]))
            df = float(np.sum(evals / den))
            resid_df = n - 1.0 - df
            scores.append(n * max(rss, 0.0) / resid_df**2 if resid_df > 0 else float("inf"))
        best = min(scores)
        l2 = max(lam for lam, sc in zip(grid, scores) if sc <= best * (1 + 1e-12))  # ties: the larger penalty
    W = V @ (Q / (evals + n * l2)[:, None])
    M = (V / (evals + n * l2)) @ V.T  # (A + N l2 I)^-1: the hat matrix, for leave-one-out logits
    # intercept: class frequency minus the standardised offset of the float32 mean actually applied
    offset = (mean64 - mean32.astype(np.float64)) / scale
    b = counts / n - offset @ W
    return {
        "mean": mean32,
        "scale": scale32,
        "W": W,
        "b": b,
        "l2": float(l2),
        "M": M,
        "offset": offset,
        "n": n,
        "gcv": None if scores is None else [float(v) for v in scores],
        "present": counts > 0,
    }


def linear_arrays(fit: dict, temperature: float) -> dict:
    """edgetl ``linear`` head arrays from a ridge fit and its temperature (absent classes: W = 0
    and a bias :data:`ABSENT_MARGIN` below the lowest present one)."""
    W = fit["W"] * temperature
    b = fit["b"] * temperature
    present = np.asarray(fit["present"], bool)
    W[:, ~present] = 0.0
    if present.any() and (~present).any():
        b[~present] = float(b[present].min()) - ABSENT_MARGIN
    return {"mean": fit["mean"], "scale": fit["scale"], "W": W.astype(np.float32), "b": b.astype(np.float32)}


# --------------------------------------------------------------------------------------------
# temperature: argmin_s sum_i w_i CE(softmax(s * z_i), t_i), a convex 1-D problem
# --------------------------------------------------------------------------------------------


def temperature_terms(
    Z: np.ndarray, target: np.ndarray, w: np.ndarray, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per grid value ``s``: the derivative ``sum w (E_p[z] - z_t)`` of the weighted cross-entropy of
    ``softmax(s z)`` and its second derivative ``sum w Var_p[z]`` -- what a device sends."""
    Z = np.asarray(Z, np.float64)
    slope = np.zeros(len(grid))
    curv = np.zeros(len(grid))
    if len(Z) == 0:
        return slope, curv
    rows = np.arange(len(Z))
    zt = Z[rows, target]
    for j, s in enumerate(grid):
        p = softmax(s * Z)
        m1 = np.sum(p * Z, axis=1)
        m2 = np.sum(p * Z * Z, axis=1)
        slope[j] = float(w @ (m1 - zt))
        curv[j] = float(w @ np.maximum(m2 - m1 * m1, 0.0))
    return slope, curv


def temperature_grid(lo: float, hi: float, points: int) -> np.ndarray:
    return np.linspace(lo, hi, points)


def bracket(grid: np.ndarray, slope: np.ndarray) -> tuple[float, float] | float:
    """The sub-interval of ``grid`` where the (increasing) slope changes sign, or the bound itself
    when the minimum lies on it (slope >= 0 at the low end, <= 0 at the high end)."""
    if slope[0] >= 0:
        return float(grid[0])
    if slope[-1] <= 0:
        return float(grid[-1])
    j = int(np.flatnonzero(slope >= 0)[0])
    return float(grid[j - 1]), float(grid[j])


def solve_temperature(grid: np.ndarray, slope: np.ndarray, curv: np.ndarray) -> float:
    """The root of the slope inside its bracket on ``grid``, from a cubic Hermite interpolant of
    slope and curvature (exact to ~1e-9 relative on a fine final grid), by bisection."""
    br = bracket(grid, slope)
    if isinstance(br, float):
        return br
    j = int(np.searchsorted(grid, br[1]))
    a, c = float(grid[j - 1]), float(grid[j])
    ga, gc, ha, hc = float(slope[j - 1]), float(slope[j]), float(curv[j - 1]), float(curv[j])
    h = c - a

    def g(x: float) -> float:
        t = (x - a) / h
        h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
        h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
        return h00 * ga + h10 * h * ha + h01 * gc + h11 * h * hc

    lo, hi = a, c
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if g(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fit_ridge_head_arrays(
    X: np.ndarray, y: np.ndarray, k: int, *, l2: float | None = None, points: int = 33
) -> tuple[dict, dict]:
    """One machine's ridge head (the fleet protocol with a single participant): (arrays, info)."""
    X = np.asarray(X, np.float32)
    X64 = X.astype(np.float64)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    sums = np.zeros((k, X.shape[1]))
    np.add.at(sums, y, X64)
    fit = ridge_from_moments(len(X), X64.sum(0), X64.T @ X64, counts, sums, l2=l2)
    T = ridge_temperature_local(X, y, fit, points=points)
    return linear_arrays(fit, T), {"l2": fit["l2"], "temperature": T}


def ridge_loo_logits(X: np.ndarray, y: np.ndarray, fit: dict) -> np.ndarray:
    """Leave-one-out logits of the rows ``X`` (labels ``y``) for a ridge fit over data they belong
    to: ``(z - h Y) / (1 - h)`` with the hat value ``h = x_c^T M x_c + 1/N``. In-sample ridge logits
    of a wide feature space fit the one-hot targets almost exactly, so a temperature fitted on them
    runs to its bound; on these it measures what unseen rows look like (as the prototype head's
    temperature does)."""
    Xs = ((np.asarray(X, np.float32) - fit["mean"]) / fit["scale"]).astype(np.float64)
    Z = Xs @ fit["W"] + fit["b"]
    xc = Xs - fit["offset"]
    h = np.einsum("ij,jk,ik->i", xc, fit["M"], xc) + 1.0 / float(fit["n"])
    h = np.minimum(h, 1.0 - 1e-6)
    Y = np.zeros_like(Z)
    Y[np.arange(len(y)), y] = 1.0
    return (Z - h[:, None] * Y) / (1.0 - h)[:, None]


def ridge_temperature_local(X, y, fit, *, points: int = 33) -> float:
    present = np.flatnonzero(fit["present"])
    if len(present) < 2:
        return 1.0
    keep = np.isin(y, present)
    Z = ridge_loo_logits(X[keep], y[keep], fit)[:, present]
    t = np.searchsorted(present, y[keep])
    w = np.ones(len(t))
    g1 = temperature_grid(*RIDGE_T_BOUNDS, points)
    s1, _ = temperature_terms(Z, t, w, g1)
    br = bracket(g1, s1)
    if isinstance(br, float):
        return br
    g2 = temperature_grid(br[0], br[1], points)
    s2, c2 = temperature_terms(Z, t, w, g2)
    return solve_temperature(g2, s2, c2)
