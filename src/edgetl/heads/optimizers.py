"""The optimisers behind the linear and MLP heads: preconditioned L-BFGS for the convex linear
problem, full-batch Adam for the MLP; numpy only, so the device trains with them too."""

from __future__ import annotations

import math

import numpy as np

from .classification import HeadConfig, softmax

# Curvature of the softmax cross-entropy per unit of squared feature, used for the diagonal
# preconditioner: p(1 - p) is at most 1/4 and shrinks as predictions sharpen; 1/4 errs on the
# side of smaller (safe) steps, and L-BFGS's own scaling corrects the rest after one iteration.
_CURVATURE = 0.25
# --------------------------------------------------------------------------------------------
# training: linear (preconditioned L-BFGS)
# --------------------------------------------------------------------------------------------


def lbfgs(fun, x0: np.ndarray, *, max_iter: int, gtol: float, memory: int = 10):
    """Minimise a smooth convex ``fun(x) -> (f, grad)`` with L-BFGS and Armijo backtracking.

    Written here because the device has no scipy. The problems are convex and preconditioned, so
    a unit step is almost always accepted and a backtracking (rather than Wolfe) search suffices;
    pairs with non-positive curvature are simply not stored.

    Returns:
        ``(x, iterations, converged)``.
    """
    x = x0.copy()
    f, g = fun(x)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    rho_hist: list[float] = []
    for it in range(max_iter):
        if np.max(np.abs(g)) <= gtol:
            return x, it, True
        q = g.copy()
        alphas = []
        for s, yv, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a = rho * float(s @ q)
            alphas.append(a)
            q -= a * yv
        gamma = float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1]) if s_hist else 1.0
        r = gamma * q
        for s, yv, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas)):
            r += (a - rho * float(yv @ r)) * s
        direction = -r
        slope = float(g @ direction)
        if not slope < 0:  # not a descent direction: forget the history, use the gradient
            s_hist.clear()
            y_hist.clear()
            rho_hist.clear()
            direction, slope = -g, -float(g @ g)
        step = 1.0
        for _ in range(30):
            x_new = x + step * direction
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:  # no measurable decrease left: converged as far as float arithmetic can tell
            return x, it, True
        s, yv = x_new - x, g_new - g
        sy = float(s @ yv)
        if sy > 1e-12 * float(yv @ yv):
            s_hist.append(s)
            y_hist.append(yv)
            rho_hist.append(1.0 / sy)
            if len(s_hist) > memory:
                s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        decrease = f - f_new
        x, f, g = x_new, f_new, g_new
        if decrease <= 1e-12 * max(1.0, abs(f)):
            return x, it + 1, True
    return x, max_iter, bool(np.max(np.abs(g)) <= gtol)


def fit_linear(Z, y, w, kp, l2, max_iter, gtol, init=None):
    """Multinomial logistic regression on basis coordinates ``Z`` (n x r) for ``kp`` classes.

    Minimises ``sum_i w_i * CE_i + (l2 / 2) ||Wz||^2`` (``w`` sums to 1); the intercept is not
    penalised. Returns ``(Wz, b, iterations, converged)`` in float64.
    """
    n, r = Z.shape
    wcol = w.astype(np.float64)
    # Diagonal curvature estimate per coordinate -> variable scaling (see module docstring).
    col_sq = (wcol @ (Z.astype(np.float64) ** 2)) if n else np.zeros(r)
    D = 1.0 / np.sqrt(_CURVATURE * col_sq + l2 + 1e-12)
    Db = 1.0 / math.sqrt(_CURVATURE)
    rows = np.arange(n)
    rk = r * kp

    def fun(theta):
        Wz = theta[:rk].reshape(r, kp) * D[:, None]
        b = theta[rk:] * Db
        # The big products run in float32 (twice the BLAS speed, ample precision for accuracy);
        # the log-sum-exp and the sums that L-BFGS compares run in float64.
        L = (Z @ Wz.astype(np.float32)).astype(np.float64) + b
        m = L.max(axis=1, keepdims=True)
        E = np.exp(L - m)
        se = E.sum(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(se[:, 0])
        f = float(wcol @ (lse - L[rows, y])) + 0.5 * l2 * float(np.sum(Wz * Wz))
        G = E / se
        G[rows, y] -= 1.0
        G *= wcol[:, None]
        gW = (Z.T @ G.astype(np.float32)).astype(np.float64) + l2 * Wz
        return f, np.concatenate([(gW * D[:, None]).ravel(), G.sum(axis=0) * Db])

    if init is None:
        # Start from the weighted class priors: the best constant model, so the first steps go
        # straight to the features.
        prior = np.bincount(y, weights=wcol, minlength=kp) + 1e-12
        Wz0, b0 = np.zeros((r, kp)), np.log(prior / prior.sum())
        b0 -= b0.mean()
    else:
        Wz0, b0 = init
    theta0 = np.concatenate([(Wz0 / D[:, None]).ravel(), b0 / Db])
    theta, iters, converged = lbfgs(fun, theta0, max_iter=max_iter, gtol=gtol)
    return theta[:rk].reshape(r, kp) * D[:, None], theta[rk:] * Db, iters, converged


# --------------------------------------------------------------------------------------------
# training: MLP (full-batch Adam)
# --------------------------------------------------------------------------------------------


def fit_mlp(Z, y, w, kp, l2, cfg: HeadConfig, fan_in: int):
    """One-hidden-layer ReLU network on ``Z`` with full-batch Adam; float32 throughout.

    Full batch keeps every step identical run to run (no sampling order to seed) and lets numpy
    spend its time in a few large matrix products instead of many small ones. Returns float32
    ``(W1, b1, W2, b2)`` with ``W1`` on the columns of ``Z``.
    """
    n, r = Z.shape
    h = cfg.hidden
    rng = np.random.default_rng(cfg.seed)
    f32 = np.float32
    # He init with the *original* fan-in: the basis is an orthogonal map of the standardised
    # features, so pre-activations get the same variance as in feature space.
    W1 = (rng.standard_normal((r, h)) * math.sqrt(2.0 / fan_in)).astype(f32)
    b1 = np.zeros(h, dtype=f32)
    W2 = (rng.standard_normal((h, kp)) * math.sqrt(1.0 / h)).astype(f32)
    b2 = np.zeros(kp, dtype=f32)
    params = [W1, b1, W2, b2]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    wcol = w.astype(f32)[:, None]
    onehot = np.zeros((n, kp), dtype=f32)
    onehot[np.arange(n), y] = 1.0
    l2f, lr = f32(l2), cfg.lr
    ZT = np.ascontiguousarray(Z.T)
    for t in range(1, cfg.epochs + 1):
        pre = Z @ W1 + b1
        act = np.maximum(pre, f32(0))
        G = (softmax(act @ W2 + b2) - onehot) * wcol
        dact = G @ W2.T
        dact *= pre > 0
        grads = [ZT @ dact + l2f * W1, dact.sum(axis=0), act.T @ G + l2f * W2, G.sum(axis=0)]
        c1 = lr / (1.0 - beta1**t)
        c2 = 1.0 / (1.0 - beta2**t)
        for p, g, a, v in zip(params, grads, m1, m2):
            a *= f32(beta1)
            a += f32(1 - beta1) * g
            v *= f32(beta2)
            v += f32(1 - beta2) * (g * g)
            p -= f32(c1) * a / (np.sqrt(v * f32(c2)) + f32(eps))
    return W1, b1, W2, b2
