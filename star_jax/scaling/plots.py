"""Paper-style figures of a scaling sweep (matplotlib, Agg backend, PNG at 200 dpi).

Each function takes plain arrays / fit dicts (`star_jax.scaling.fits`) and a path, draws one
figure and returns the path: loss against compute per size with the fitted frontier, isoFLOP
curves with their minima, the compute-optimal N*(C) and D*(C), and the residuals of the fits.
"""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from star_jax.scaling import fits  # noqa: E402

DPI = 200
plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 7.5})


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.0f} k"


def _colors(k: int, cmap: str = "viridis"):
    return plt.get_cmap(cmap)(np.linspace(0.05, 0.9, max(k, 1)))


def _plain_log_y(ax) -> None:
    """Loss ticks as plain numbers (3.5, not 3.5 x 10^0) on a log axis."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loss_vs_compute(
    compute, loss, size, labels: dict, frontier: dict | None, path: str, *, prediction: dict | None = None, diverged=()
) -> str:
    """Held-out loss against training FLOPs, one line per model size (`size` [k] keys of `labels`,
    e.g. non-embedding params -> "1 layer, 0.22 M"), the fitted frontier L(C) = E + a C^-b and,
    when given, the held-out prediction ({"compute", "predicted", "actual", "fit"}). `diverged`:
    compute values of diverged runs, marked on the axis."""
    compute, loss, size = map(np.asarray, (compute, loss, size))
    fig, ax = plt.subplots(figsize=(5.2, 3.8), layout="constrained")
    keys = sorted(labels)
    for color, key in zip(_colors(len(keys)), keys):
        m = size == key
        order = np.argsort(compute[m])
        ax.plot(compute[m][order], loss[m][order], "o-", color=color, ms=4, lw=1.2, label=labels[key])
    grid = np.geomspace(compute.min() / 1.5, compute.max() * 2.5, 200)
    if frontier is not None:
        ax.plot(
            grid,
            fits.frontier_curve(frontier, grid),
            "k--",
            lw=1.2,
            label=f"frontier $L = {frontier['E']:.2f} + {frontier['a']:.3g}\\,C^{{-{frontier['b']:.3f}}}$"
            f" ($R^2$ {frontier['r2']:.3f})",
        )
    if prediction is not None:
        ax.plot(
            grid,
            fits.frontier_curve(prediction["fit"], grid),
            ":",
            color="tab:red",
            lw=1.2,
            label="frontier fitted without the largest budget",
        )
        ax.plot(
            [prediction["compute"]],
            [prediction["predicted"]],
            "*",
            color="tab:red",
            ms=11,
            label=f"predicted best {prediction['predicted']:.3f} (actual {prediction['actual']:.3f})",
        )
    for c in diverged:
        ax.axvline(c, color="tab:red", alpha=0.3, lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs, analytic)")
    ax.set_ylabel("held-out loss (nats / image token)")
    _plain_log_y(ax)
    ax.set_title("Loss against compute per stack size")
    ax.legend(loc="lower left")
    return _save(fig, path)


def isoflop(compute, n, loss, minima: list[dict], path: str) -> str:
    """Loss against non-embedding params per compute budget, the fitted parabolas in log N and their
    minima (filled: inside the sampled sizes; hollow: outside, so only the best sampled size)."""
    compute, n, loss = map(np.asarray, (compute, n, loss))
    ids = fits.group_budgets(compute)
    fig, ax = plt.subplots(figsize=(5.2, 3.8), layout="constrained")
    colors = _colors(ids.max() + 1, "plasma")
    for g in range(ids.max() + 1):
        m = ids == g
        c = np.exp(np.mean(np.log(compute[m])))
        ax.plot(n[m], loss[m], "o", color=colors[g], ms=4.5, label=f"C = {c:.2g} FLOPs")
        found = [r for r in minima if abs(np.log(r["compute"] / c)) < 0.1]
        if found:
            r = found[0]
            x = np.linspace(np.log(n[m].min()) - 0.2, np.log(n[m].max()) + 0.2, 100)
            ax.plot(np.exp(x), np.polyval(r["coeffs"], x), "-", color=colors[g], lw=1.0)
            face = "none" if r["outside"] else colors[g]
            ax.plot([r["N_opt"]], [r["loss_opt"]], "D", ms=7, mec="k", mfc=face)
    ax.plot([], [], "D", mec="k", mfc="grey", label="minimum (hollow: outside the grid)")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding trainable parameters N")
    ax.set_ylabel("held-out loss (nats / image token)")
    ax.set_title("IsoFLOP curves")
    ax.legend(loc="best")
    return _save(fig, path)


def optimal_allocation(minima: list[dict], n_fit: dict | None, d_fit: dict | None, path: str, law=None) -> str:
    """N*(C) and D*(C) of the isoFLOP minima (hollow: outside the grid) with their power fits and,
    when given, the compute-optimal curve of the fitted L(N, D) (`law`: {"compute", "N", "D"})."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), layout="constrained")
    c = np.array([r["compute"] for r in minima])
    for ax, key, fit, name in ((axes[0], "N_opt", n_fit, "N"), (axes[1], "D_opt", d_fit, "D")):
        y = np.array([r[key] for r in minima])
        inside = np.array([not r["outside"] for r in minima])
        ax.plot(c[inside], y[inside], "o", color="tab:blue", label="isoFLOP minimum")
        ax.plot(c[~inside], y[~inside], "o", mfc="none", color="tab:blue", label="best sampled (minimum outside)")
        if fit is not None and len(c):
            grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
            ax.plot(
                grid,
                fit["k"] * grid ** fit["exponent"],
                "k--",
                lw=1.0,
                label=f"${name}^* \\propto C^{{{fit['exponent']:.2f}}}$",
            )
        if law is not None:
            ax.plot(law["compute"], law[name], "-", color="tab:orange", lw=1.0, label="$L(N, D)$ fit optimum")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel("N* (non-embedding params)" if name == "N" else "D* (image tokens)")
        ax.legend(loc="best")
    fig.suptitle("Compute-optimal allocation", fontsize=10)
    return _save(fig, path)


def residuals(compute, size, labels: dict, observed, predicted, path: str, title: str) -> str:
    """Relative residuals observed / predicted - 1 against compute, one colour per size."""
    compute, size, observed, predicted = map(np.asarray, (compute, size, observed, predicted))
    fig, ax = plt.subplots(figsize=(5.2, 3.2), layout="constrained")
    keys = sorted(labels)
    for color, key in zip(_colors(len(keys)), keys):
        m = size == key
        ax.plot(compute[m], 100 * (observed[m] / predicted[m] - 1), "o", color=color, ms=4.5, label=labels[key])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("residual (%)")
    ax.set_title(title)
    ax.legend(loc="best")
    return _save(fig, path)
