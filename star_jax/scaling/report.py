"""A sweep's report: read its manifest, fit the laws, draw the figures, write report.md + fits.json.

  write_report(workdir, out_dir) -> path of report.md

Finished runs enter the fits; diverged ones are listed with their note and left out; runs not
finished yet are counted. The held-out prediction: every fit is repeated without the largest
compute budget and predicts that budget's best loss, the error is reported beside the truth.
"""

from __future__ import annotations

import json
import os

import numpy as np

from star_jax.scaling import fits, plots

MANIFEST = "manifest.jsonl"


def collect(workdir: str) -> dict:
    """{"finished": [record], "diverged": [record], "pending": [run key]} of the sweep's sweep runs
    (shared runs left out), the last manifest event of each run. Raises ValueError when the
    manifest is missing."""
    path = os.path.join(workdir, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"--workdir {workdir!r} has no {MANIFEST} (run the sweep first)")
    latest = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            latest[record["run"]] = record
    runs = [r for r in latest.values() if not r.get("shared") and not r["run"].startswith("shared/")]
    return {
        "finished": [r for r in runs if r["status"] == "finished"],
        "diverged": [r for r in runs if r["status"] == "diverged"],
        "pending": [r["run"] for r in runs if r["status"] not in ("finished", "diverged")],
    }


def arrays(records: list[dict]) -> dict[str, np.ndarray]:
    """Columns of finished runs: compute (FLOPs), N (non-embedding trainable params), D (target
    tokens), loss (held-out), layers (stack depth, or 0 when the overrides do not set it)."""
    return {
        "compute": np.array([r["flops"] for r in records], float),
        "N": np.array([r["non_embedding_params"] for r in records], float),
        "D": np.array([r["target_tokens"] for r in records], float),
        "loss": np.array([r["heldout_loss"] for r in records], float),
        "layers": np.array([r.get("overrides", {}).get("model.star.stack_layers", 0) for r in records], int),
    }


def cost_per_token(compute, n, d) -> dict:
    """C / D = c0 + c1 * N by least squares: a frozen part costs c0 per token, the trained part
    c1 per param and token (6 for a plain decoder without attention). Returns {"c0", "c1"}."""
    per_token = np.asarray(compute) / np.asarray(d)
    c1, c0 = np.polyfit(np.asarray(n, float), per_token, 1)
    return {"c0": float(c0), "c1": float(c1)}


def best_per_budget(a: dict) -> tuple[np.ndarray, np.ndarray]:
    """(compute, best loss) per compute budget (runs grouped by `fits.group_budgets`)."""
    ids = fits.group_budgets(a["compute"])
    c = np.array([np.exp(np.mean(np.log(a["compute"][ids == g]))) for g in range(ids.max() + 1)])
    best = np.array([a["loss"][ids == g].min() for g in range(ids.max() + 1)])
    return c, best


def analyse(a: dict, *, bootstrap: int = 100, seed: int = 0) -> dict:
    """Every fit on the columns `a` (`arrays`); a fit that needs more points than there are is None."""
    c_best, l_best = best_per_budget(a)
    out = {"budgets": c_best.tolist(), "best_loss": l_best.tolist()}
    out["frontier"] = fits.fit_frontier(c_best, l_best) if len(c_best) >= 3 else None
    out["chinchilla"] = (
        fits.fit_chinchilla(a["N"], a["D"], a["loss"], bootstrap=bootstrap, seed=seed) if len(a["loss"]) >= 6 else None
    )
    minima = fits.isoflop_minima(a["compute"], a["N"], a["D"], a["loss"])
    out["isoflop"] = minima
    inside = [m for m in minima if not m["outside"]]
    # N*(C) and D*(C) only from minima inside the grid: an edge point says "at most / at least".
    out["n_opt"] = (
        fits.fit_power([m["compute"] for m in inside], [m["N_opt"] for m in inside]) if len(inside) >= 2 else None
    )
    out["d_opt"] = (
        fits.fit_power([m["compute"] for m in inside], [m["D_opt"] for m in inside]) if len(inside) >= 2 else None
    )
    cost = cost_per_token(a["compute"], a["N"], a["D"])
    out["cost_per_token"] = cost
    if out["chinchilla"] is not None:
        law = fits.chinchilla_optimum(out["chinchilla"], c_best, lambda n: cost["c0"] + cost["c1"] * n)
        out["law_optimum"] = {k: v.tolist() for k, v in law.items()}
    return out


def predict_largest(a: dict, *, bootstrap: int = 0) -> dict | None:
    """Fits on every budget but the largest and predicts the largest budget's best held-out loss:
    by the frontier (needs 3 smaller budgets) and by L(N, D) at the sizes run there (needs 6
    runs). Returns {"compute", "actual", "frontier": {...}, "chinchilla": {...}} or None."""
    ids = fits.group_budgets(a["compute"])
    if ids.max() < 1:
        return None
    last = ids == ids.max()
    train = {k: v[~last] for k, v in a.items()}
    actual = float(a["loss"][last].min())
    c_last = float(np.exp(np.mean(np.log(a["compute"][last]))))
    out = {"compute": c_last, "actual": actual, "budgets_fitted": int(ids.max())}
    c_best, l_best = best_per_budget(train)
    if len(c_best) >= 3:
        fit = fits.fit_frontier(c_best, l_best)
        pred = float(fits.frontier_curve(fit, c_last))
        out["frontier"] = {"fit": fit, "predicted": pred, "error": pred / actual - 1}
    if len(train["loss"]) >= 6:
        fit = fits.fit_chinchilla(train["N"], train["D"], train["loss"], bootstrap=bootstrap)
        pred = float(np.min(fits.chinchilla_loss(fit, a["N"][last], a["D"][last])))
        out["chinchilla"] = {"fit": fit, "predicted": pred, "error": pred / actual - 1}
    return out


def _interval(fit: dict, key: str, fmt: str) -> str:
    lo_hi = fit.get("intervals", {}).get(key)
    return f"{fit[key]:{fmt}} [{lo_hi[0]:{fmt}}, {lo_hi[1]:{fmt}}]" if lo_hi else f"{fit[key]:{fmt}}"


def _labels(a: dict) -> dict:
    out = {}
    for n in np.unique(a["N"]):
        layers = a["layers"][a["N"] == n][0]
        out[n] = (f"{layers}-layer stack, " if layers else "") + f"N = {plots._fmt_params(n)}"
    return out


def write_report(workdir: str, out_dir: str, *, sweep_file: str | None = None, bootstrap: int = 100) -> str:
    """Fits, figures, report.md and fits.json of the sweep in `workdir`, written to `out_dir`.
    Raises ValueError (one line) when the manifest is missing or no run has finished."""
    runs = collect(workdir)
    if not runs["finished"]:
        raise ValueError(f"--workdir {workdir!r}: no finished run to fit yet ({len(runs['pending'])} pending)")
    os.makedirs(out_dir, exist_ok=True)
    a = arrays(runs["finished"])
    result = analyse(a, bootstrap=bootstrap)
    prediction = predict_largest(a)
    labels = _labels(a)
    size = a["N"]
    figures = {}
    pred_plot = None
    if prediction and "frontier" in prediction:
        p = prediction["frontier"]
        pred_plot = {
            "compute": prediction["compute"],
            "predicted": p["predicted"],
            "actual": prediction["actual"],
            "fit": p["fit"],
        }
    figures["loss_vs_compute"] = plots.loss_vs_compute(
        a["compute"],
        a["loss"],
        size,
        labels,
        result["frontier"],
        os.path.join(out_dir, "loss_vs_compute.png"),
        prediction=pred_plot,
        diverged=[r["flops"] for r in runs["diverged"]],
    )
    if result["isoflop"]:
        figures["isoflop"] = plots.isoflop(
            a["compute"], a["N"], a["loss"], result["isoflop"], os.path.join(out_dir, "isoflop.png")
        )
        figures["optimal_allocation"] = plots.optimal_allocation(
            result["isoflop"],
            result["n_opt"],
            result["d_opt"],
            os.path.join(out_dir, "optimal_allocation.png"),
            law=result.get("law_optimum") and {k: np.asarray(v) for k, v in result["law_optimum"].items()},
        )
    if result["chinchilla"] is not None:
        figures["residuals"] = plots.residuals(
            a["compute"],
            size,
            labels,
            a["loss"],
            fits.chinchilla_loss(result["chinchilla"], a["N"], a["D"]),
            os.path.join(out_dir, "residuals.png"),
            "Residuals of the $L(N, D)$ fit",
        )
    with open(os.path.join(out_dir, "fits.json"), "w") as f:
        json.dump({"analysis": result, "prediction": prediction, "runs": runs}, f, indent=1, default=_json)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(_markdown(workdir, sweep_file, runs, a, result, prediction, figures, out_dir, bootstrap))
    return path


def _json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


def _markdown(workdir, sweep_file, runs, a, result, prediction, figures, out_dir, bootstrap) -> str:
    lines = ["# Scaling sweep report", ""]
    if sweep_file:
        lines += [
            f"Sweep `{sweep_file}`, workdir `{workdir}`. Regenerate with",
            "",
            "```bash",
            f"star-jax sweep --sweep {sweep_file} --workdir {workdir} --report --out {out_dir} --bootstrap {bootstrap}",
            "```",
            "",
        ]
    lines += [
        f"{len(runs['finished'])} runs finished, {len(runs['diverged'])} diverged, {len(runs['pending'])} not finished.",
        "Compute C: analytic training FLOPs of what each step computes (frozen VQ encoder and base "
        "included; `star_jax/flops.py`). N: non-embedding trainable parameters. D: image tokens trained "
        "on. Loss: mean cross-entropy per image token on the fixed held-out set.",
        "",
    ]
    for name, fig in figures.items():
        lines += [f"![{name}]({os.path.basename(fig)})", ""]
    lines += ["## Fitted laws", "", "| law | parameters (90 % bootstrap interval) | fit |", "|---|---|---|"]
    fr = result["frontier"]
    if fr:
        lines.append(
            f"| frontier $L(C) = E + a C^{{-b}}$ | E = {fr['E']:.4f}, a = {fr['a']:.4g}, b = {fr['b']:.4f} | "
            f"R² = {fr['r2']:.4f} on {fr['n']} budgets' best runs |"
        )
    ch = result["chinchilla"]
    if ch:
        lines.append(
            "| $L(N, D) = E + A/N^α + B/D^β$ | "
            f"E = {_interval(ch, 'E', '.4f')}, A = {_interval(ch, 'A', '.4g')}, B = {_interval(ch, 'B', '.4g')}, "
            f"α = {_interval(ch, 'alpha', '.3f')}, β = {_interval(ch, 'beta', '.3f')} | "
            f"R² = {ch['r2']:.4f}, RMSE(log L) = {ch['rmse_log']:.4f} on {ch['n']} runs, {ch['bootstrap']} bootstrap fits |"
        )
        lines.append(
            f"| implied allocation (6ND compute) | N* ∝ C^{ch['beta'] / (ch['alpha'] + ch['beta']):.3f}, "
            f"D* ∝ C^{ch['alpha'] / (ch['alpha'] + ch['beta']):.3f} | β/(α+β), α/(α+β) |"
        )
    for key, name in (("n_opt", "N*(C)"), ("d_opt", "D*(C)")):
        fit = result[key]
        if fit:
            lines.append(
                f"| isoFLOP {name} ∝ C^e | e = {fit['exponent']:.3f}, k = {fit['k']:.4g} | "
                f"R² = {fit['r2']:.3f} on {fit['n']} budgets' interior minima |"
            )
        elif result["isoflop"]:
            inside = sum(not m["outside"] for m in result["isoflop"])
            lines.append(
                f"| isoFLOP {name} ∝ C^e | not determined | {inside} of {len(result['isoflop'])} budgets have their "
                "minimum inside the sampled sizes (2 needed) |"
            )
    cost = result["cost_per_token"]
    lines += [
        "",
        f"Cost per trained token: C/D = {cost['c0']:.4g} + {cost['c1']:.3f}·N FLOPs (fitted to the runs): "
        "the frozen part per token is what makes 6ND the wrong compute model here.",
        "",
    ]
    if result["isoflop"]:
        lines += [
            "## IsoFLOP minima",
            "",
            "| budget C | N* | D* | loss at N* | best observed | minimum |",
            "|---|---|---|---|---|---|",
        ]
        for m in result["isoflop"]:
            lines.append(
                f"| {m['compute']:.3g} | {m['N_opt']:,.0f} | {m['D_opt']:,.0f} | {m['loss_opt']:.4f} | "
                f"{m['best_loss']:.4f} | {'outside the grid (best sampled size)' if m['outside'] else 'inside'} |"
            )
        lines.append("")
    lines += ["## Prediction of the largest budget", ""]
    if prediction:
        lines.append(
            f"Fitted on the {prediction['budgets_fitted']} smaller budgets, predicting the best held-out loss at "
            f"C = {prediction['compute']:.3g} (actual {prediction['actual']:.4f}):"
        )
        lines += ["", "| predictor | predicted | error |", "|---|---|---|"]
        for key, name in (("frontier", "frontier L(C)"), ("chinchilla", "L(N, D) at the sizes run there")):
            if key in prediction:
                p = prediction[key]
                lines.append(f"| {name} | {p['predicted']:.4f} | {100 * p['error']:+.2f} % |")
        lines.append("")
    else:
        lines += ["Needs at least two budgets.", ""]
    lines += ["## Runs", "", "| run | C (FLOPs) | N | D | held-out loss | status |", "|---|---|---|---|---|---|"]
    for r in sorted(runs["finished"] + runs["diverged"], key=lambda r: (r["flops"], r["non_embedding_params"])):
        loss = r.get("heldout_loss")
        lines.append(
            f"| `{r['run']}` | {r['flops']:.3g} | {r['non_embedding_params']:,} | {r['target_tokens']:,} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {r['status']} |"
        )
    if runs["diverged"]:
        lines += ["", "Diverged runs (left out of every fit):"]
        lines += [f"- `{r['run']}`: {r.get('note', '')}" for r in runs["diverged"]]
    if runs["pending"]:
        lines += ["", "Not finished (left out): " + ", ".join(f"`{k}`" for k in runs["pending"])]
    return "\n".join(lines) + "\n"
