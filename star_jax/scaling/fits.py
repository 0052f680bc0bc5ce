"""Scaling-law fits, each a plain function of numpy arrays (no star_jax state).

fit_frontier(compute, loss)          L(C) = E + a * C^-b, least squares on log-loss, multi-start
fit_chinchilla(N, D, loss)           Hoffmann et al.'s approach 3: L(N, D) = E + A / N^alpha + B / D^beta,
                                     Huber loss on log-loss, multi-start L-BFGS-B, bootstrap intervals
isoflop_minima(compute, N, D, loss)  approach 2: a parabola in log N per compute budget, its minimum
                                     (flagged when outside the sampled sizes)
fit_power(x, y)                      y = k * x^e in log-log (N*(C), D*(C) exponents)
chinchilla_optimum(fit, C, cost)     the law's compute-optimal N, D, loss at budget C when a run of
                                     N params on D tokens costs cost(N) * D FLOPs
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import optimize


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _check(name: str, *arrays: np.ndarray, positive: bool = True, min_len: int = 1) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    if len({len(a) for a in out}) != 1:
        raise ValueError(f"{name}: arrays of different lengths {[len(a) for a in out]}")
    if len(out[0]) < min_len:
        raise ValueError(f"{name}: needs at least {min_len} points, got {len(out[0])}")
    for a in out:
        if not np.all(np.isfinite(a)) or (positive and np.any(a <= 0)):
            raise ValueError(f"{name}: every value must be finite and positive")
    return out


# -- L(C) = E + a C^-b ---------------------------------------------------------------------------------


def frontier_curve(fit: dict, compute) -> np.ndarray:
    """L(C) of a `fit_frontier` result at `compute` (array)."""
    return fit["E"] + fit["a"] * np.asarray(compute, dtype=np.float64) ** (-fit["b"])


def fit_frontier(compute, loss) -> dict:
    """Fits L(C) = E + a * C^-b to points (compute [n] FLOPs, loss [n]), n >= 3.

    Least squares on log L (relative errors weigh alike across the range), E in [0, min loss),
    multi-start (E a fraction of the smallest loss), compute scaled by its geometric mean for
    conditioning. Returns {"E", "a", "b", "r2" (on the losses), "rmse_log", "n"}.
    """
    c, y = _check("fit_frontier", compute, loss, min_len=3)
    c0 = float(np.exp(np.mean(np.log(c))))
    x = np.log(c / c0)
    ly = np.log(y)

    def residual(p):
        e, log_a, b = p
        return np.log(e + np.exp(log_a - b * x)) - ly

    best = None
    for frac in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99):
        e0 = frac * y.min()
        span = max(y.max() - e0, 1e-12)
        b0 = max(1e-3, -np.polyfit(x, np.log(np.maximum(y - e0, 1e-12 * span)), 1)[0])
        start = [e0, np.log(max(np.exp(np.mean(np.log(np.maximum(y - e0, 1e-12)))), 1e-12)), b0]
        try:
            res = optimize.least_squares(
                residual, start, bounds=([0.0, -50.0, 0.0], [y.min() * (1 - 1e-9), 50.0, 10.0]), method="trf"
            )
        except ValueError:
            continue
        if best is None or res.cost < best.cost:
            best = res
    e, log_a, b = best.x
    a = float(np.exp(log_a) * c0**b)
    fit = {"E": float(e), "a": a, "b": float(b), "n": len(c)}
    pred = frontier_curve(fit, c)
    fit["r2"] = _r2(y, pred)
    fit["rmse_log"] = float(np.sqrt(np.mean((np.log(pred) - ly) ** 2)))
    return fit


# -- L(N, D) = E + A / N^alpha + B / D^beta ----------------------------------------------------------------

# Hoffmann et al. (2022), appendix D.2: the grid of initialisations and the Huber delta.
_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
HUBER_DELTA = 1e-3


def chinchilla_loss(fit: dict, n, d) -> np.ndarray:
    """L(N, D) of a `fit_chinchilla` result."""
    n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def _lse3(terms: np.ndarray) -> np.ndarray:
    """log(sum(exp(terms), axis=0)) of a [3, n] array (numpy alone: fast on small arrays)."""
    top = terms.max(axis=0)
    return top + np.log(np.exp(terms - top).sum(axis=0))


def _huber_objective(p, log_n, log_d, log_l, delta):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) / delta^2 (scaled so that the
    optimiser's relative tolerance means the same for every delta) and its gradient in
    p = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = p
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    lse = _lse3(terms)
    r = lse - log_l
    small = np.abs(r) <= delta
    scale = 1.0 / delta**2
    value = scale * np.sum(np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)))
    dr = scale * np.where(small, r, delta * np.sign(r))
    w = np.exp(terms - lse)  # softmax weights [3, n]
    grad = np.array(
        [
            np.sum(dr * w[0]),
            np.sum(dr * w[1]),
            np.sum(dr * w[2]),
            -np.sum(dr * w[0] * log_n),
            -np.sum(dr * w[1] * log_d),
        ]
    )
    return value, grad


def _minimise(starts, log_n, log_d, log_l, delta):
    best = None
    bounds = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
    for p0 in starts:
        res = optimize.minimize(
            _huber_objective,
            np.asarray(p0, float),
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"ftol": 1e-12, "gtol": 1e-8, "maxiter": 3000},
        )
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    return best


def _best_starts(starts: np.ndarray, log_n, log_d, log_l, delta, top: int) -> np.ndarray:
    """The `top` grid points with the smallest objective (evaluated at once, [starts, points])."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, e + 0 * log_n])
    r = _lse3(terms) - log_l
    value = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1)
    return starts[np.argsort(value)[:top]]


def _as_dict(p) -> dict:
    a, b, e, alpha, beta = (float(v) for v in p)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def fit_chinchilla(
    n,
    d,
    loss,
    *,
    bootstrap: int = 200,
    level: float = 0.9,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    grid=None,
    top: int = 12,
) -> dict:
    """Fits L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3).

    n [k] parameters, d [k] training tokens, loss [k] (k >= 5). Minimises the Huber loss (delta)
    of log L - LSE(a - alpha log N, b - beta log D, e), with A = e^a, B = e^b, E = e^e, by L-BFGS-B
    from the `top` points of the paper's initialisation grid (or `grid`, same keys) with the
    smallest objective (the whole grid is evaluated); then `bootstrap` refits on points resampled
    with replacement (started from the best fit and the 2 best grid points of the resample)
    give the central `level` interval of every parameter.
    Returns {"E", "A", "B", "alpha", "beta", "r2" (on the losses), "rmse_log", "n",
    "intervals": {name: (low, high)}, "bootstrap": number of successful resamples}.
    """
    n, d, y = _check("fit_chinchilla", n, d, loss, min_len=5)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(y)
    grid = grid or _GRID
    starts = [
        (a, b, e, al, be)
        for al, be, e, a, b in itertools.product(grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"])
    ]
    best = _minimise(_best_starts(np.asarray(starts), log_n, log_d, log_l, delta, top), log_n, log_d, log_l, delta)
    fit = _as_dict(best.x)
    pred = chinchilla_loss(fit, n, d)
    fit |= {"r2": _r2(y, pred), "rmse_log": float(np.sqrt(np.mean((np.log(pred) - log_l) ** 2))), "n": len(n)}
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(idx)) < 5:
            continue
        few = _best_starts(np.asarray(starts), log_n[idx], log_d[idx], log_l[idx], delta, 2)
        res = _minimise([best.x, *few], log_n[idx], log_d[idx], log_l[idx], delta)
        if res is not None:
            samples.append(_as_dict(res.x))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    fit["intervals"] = (
        {
            k: (float(np.percentile([s[k] for s in samples], lo)), float(np.percentile([s[k] for s in samples], hi)))
            for k in ("E", "A", "B", "alpha", "beta")
        }
        if samples
        else {}
    )
    fit["bootstrap"] = len(samples)
    fit["level"] = level
    return fit


def chinchilla_optimum(fit: dict, compute, cost_per_token, n_range=(1e3, 1e13), points: int = 4001) -> dict:
    """The compute-optimal point of a `fit_chinchilla` law at each budget in `compute`.

    cost_per_token: N -> training FLOPs per token of a model with N params (vectorised), so that
    D = C / cost(N); with 6N this is Chinchilla's allocation, with a fixed frozen part per token
    (STAR's base, VQ, head) it is not. Minimises L(N, C / cost(N)) over a log grid of N in
    `n_range`. Returns {"compute", "N", "D", "loss"} arrays.
    """
    c = np.atleast_1d(np.asarray(compute, dtype=np.float64))
    grid = np.exp(np.linspace(np.log(n_range[0]), np.log(n_range[1]), points))
    cost = np.asarray(cost_per_token(grid), dtype=np.float64)
    out = {"compute": c, "N": np.empty_like(c), "D": np.empty_like(c), "loss": np.empty_like(c)}
    for i, ci in enumerate(c):
        d = ci / cost
        loss = chinchilla_loss(fit, grid, d)
        j = int(np.argmin(loss))
        out["N"][i], out["D"][i], out["loss"][i] = grid[j], d[j], loss[j]
    return out


# -- approach 2: isoFLOP parabolas -------------------------------------------------------------------------


def group_budgets(compute, rtol: float = 0.1) -> np.ndarray:
    """Integer budget ids [k] for runs whose compute agrees within `rtol` (sorted by compute)."""
    c = np.asarray(compute, dtype=np.float64)
    order = np.argsort(c)
    ids = np.empty(len(c), dtype=int)
    current, anchor = -1, None
    for i in order:
        if anchor is None or c[i] > anchor * (1 + rtol):
            current += 1
            anchor = c[i]
        ids[i] = current
    return ids


def isoflop_minima(compute, n, d, loss, rtol: float = 0.1) -> list[dict]:
    """Per compute budget (runs grouped by `group_budgets`), a parabola loss = p0 + p1 x + p2 x^2
    in x = log N and its minimum (Hoffmann et al.'s approach 2).

    Returns one dict per budget with >= 3 sizes, by increasing compute: "compute" (geometric mean
    of the group), "N_opt", "D_opt" (from a log-log line of D against N in the group), "loss_opt",
    "coeffs" (p2, p1, p0), "outside" (True when the minimum lies outside the sampled sizes or the
    parabola opens downwards: then N_opt is the best sampled size and not an interpolation),
    "best_loss" (the smallest observed), "sizes" (the sampled N).
    """
    c, n, d, y = _check("isoflop_minima", compute, n, d, loss)
    ids = group_budgets(c, rtol)
    out = []
    for g in range(ids.max() + 1):
        m = ids == g
        if len(np.unique(n[m])) < 3:
            continue
        x, yy = np.log(n[m]), y[m]
        p2, p1, p0 = np.polyfit(x, yy, 2)
        slope, icpt = np.polyfit(x, np.log(d[m]), 1)
        best = int(np.argmin(yy))
        if p2 > 0 and x.min() <= -p1 / (2 * p2) <= x.max():
            x_opt, outside = -p1 / (2 * p2), False
            loss_opt = p0 + p1 * x_opt + p2 * x_opt**2
        else:
            x_opt, outside, loss_opt = x[best], True, yy[best]
        out.append(
            {
                "compute": float(np.exp(np.mean(np.log(c[m])))),
                "N_opt": float(np.exp(x_opt)),
                "D_opt": float(np.exp(icpt + slope * x_opt)),
                "loss_opt": float(loss_opt),
                "coeffs": (float(p2), float(p1), float(p0)),
                "outside": bool(outside),
                "best_loss": float(yy[best]),
                "sizes": [float(v) for v in np.sort(n[m])],
            }
        )
    return out


def fit_power(x, y) -> dict:
    """y = k * x^e by least squares in log-log. Returns {"k", "exponent", "r2" (log space), "n"}."""
    x, y = _check("fit_power", x, y, min_len=2)
    e, log_k = np.polyfit(np.log(x), np.log(y), 1)
    pred = log_k + e * np.log(x)
    return {"k": float(np.exp(log_k)), "exponent": float(e), "r2": _r2(np.log(y), pred), "n": len(x)}
