"""Scaling-law fits recover known laws from noisy synthetic losses; the report reads a manifest."""

import json
import os

import numpy as np
import pytest

from star_jax.scaling import fits, report

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.'s fit


def _grid_runs(noise: float, seed: int = 0):
    """IsoFLOP runs of the TRUE law: 5 budgets x 7 sizes around the optimum, C = 6 N D."""
    rng = np.random.default_rng(seed)
    budgets = np.geomspace(1e18, 1e21, 5)
    opt = fits.chinchilla_optimum(TRUE, budgets, lambda n: 6.0 * n)
    c, n, d = [], [], []
    for budget, n_opt in zip(budgets, opt["N"]):
        for f in np.geomspace(1 / 8, 8, 7):
            c.append(budget)
            n.append(n_opt * f)
            d.append(budget / (6.0 * n_opt * f))
    c, n, d = map(np.array, (c, n, d))
    loss = fits.chinchilla_loss(TRUE, n, d) * np.exp(rng.normal(0.0, noise, len(c)))
    return c, n, d, loss


def test_frontier_recovers_the_exponent_from_noisy_losses():
    rng = np.random.default_rng(1)
    c = np.geomspace(1e15, 1e19, 10)
    loss = (1.8 + 300.0 * c**-0.16) * np.exp(rng.normal(0.0, 0.003, len(c)))
    fit = fits.fit_frontier(c, loss)
    assert fit["b"] == pytest.approx(0.16, rel=0.05)
    assert fit["E"] == pytest.approx(1.8, rel=0.05)
    assert fit["r2"] > 0.99
    assert np.allclose(fits.frontier_curve(fit, c), loss, rtol=0.02)


def test_chinchilla_fit_recovers_exponents_with_intervals():
    c, n, d, loss = _grid_runs(noise=0.004)
    fit = fits.fit_chinchilla(n, d, loss, bootstrap=8, seed=0)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05)
    assert fit["beta"] == pytest.approx(TRUE["beta"], rel=0.05)
    assert fit["E"] == pytest.approx(TRUE["E"], rel=0.05)
    assert fit["bootstrap"] >= 6
    for key in ("alpha", "beta", "E"):
        low, high = fit["intervals"][key]
        assert low <= high and low < fit[key] * 1.05 and high > fit[key] * 0.95


def test_isoflop_minima_and_optimal_exponents():
    c, n, d, loss = _grid_runs(noise=0.001)
    minima = fits.isoflop_minima(c, n, d, loss)
    assert len(minima) == 5 and not any(m["outside"] for m in minima)
    law = fits.chinchilla_optimum(TRUE, [m["compute"] for m in minima], lambda n: 6.0 * n)
    for m, n_true in zip(minima, law["N"]):
        assert m["N_opt"] == pytest.approx(n_true, rel=0.35)
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N* ~ C^a, D* ~ C^(1 - a)
    n_fit = fits.fit_power([m["compute"] for m in minima], [m["N_opt"] for m in minima])
    d_fit = fits.fit_power([m["compute"] for m in minima], [m["D_opt"] for m in minima])
    assert n_fit["exponent"] == pytest.approx(a, rel=0.05)
    assert d_fit["exponent"] == pytest.approx(1 - a, rel=0.05)


def test_isoflop_flags_a_minimum_outside_the_grid():
    c, n, d, loss = _grid_runs(noise=0.0)
    keep = n / np.array([n[c == ci].min() for ci in c]) > 12  # only sizes >= 2x the optimum
    minima = fits.isoflop_minima(c[keep], n[keep], d[keep], loss[keep])
    assert minima and all(m["outside"] for m in minima)
    assert all(m["N_opt"] == pytest.approx(min(m["sizes"])) for m in minima)


def test_fits_reject_bad_arrays():
    with pytest.raises(ValueError, match="different lengths"):
        fits.fit_frontier([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite and positive"):
        fits.fit_chinchilla([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, np.nan, 4, 5])
    with pytest.raises(ValueError, match="at least 3"):
        fits.fit_frontier([1.0, 2.0], [1.0, 2.0])


def _manifest(path, c, n, d, loss):
    with open(path, "w") as f:
        f.write(json.dumps({"run": "shared/vq", "status": "finished", "shared": True, "flops": 0}) + "\n")
        for i, row in enumerate(zip(c, n, d, loss)):
            rec = {"run": f"r{i}", "flops": row[0], "non_embedding_params": row[1], "target_tokens": row[2]}
            f.write(json.dumps(rec | {"status": "started"}) + "\n")
            f.write(json.dumps(rec | {"status": "finished", "heldout_loss": row[3]}) + "\n")
        f.write(
            json.dumps(
                {
                    "run": "big",
                    "status": "diverged",
                    "flops": 1e21,
                    "non_embedding_params": 1e9,
                    "target_tokens": 1e9,
                    "note": "non-finite loss nan at step 7",
                }
            )
            + "\n"
        )
        f.write(json.dumps({"run": "late", "status": "started", "flops": 1e20}) + "\n")


def test_report_from_a_manifest(tmp_path):
    c, n, d, loss = _grid_runs(noise=0.002)
    _manifest(tmp_path / "manifest.jsonl", c, n, d, loss)
    path = report.write_report(str(tmp_path), str(tmp_path / "out"), sweep_file="configs/sweeps/x.py", bootstrap=4)
    text = open(path).read()
    for name in ("loss_vs_compute", "isoflop", "optimal_allocation", "residuals"):
        assert os.path.getsize(tmp_path / "out" / f"{name}.png") > 10_000
        assert f"({name}.png)" in text
    assert "| frontier" in text and "α = " in text and "Prediction of the largest budget" in text
    assert "`big`: non-finite loss nan at step 7" in text and "Not finished (left out): `late`" in text
    saved = json.load(open(tmp_path / "out" / "fits.json"))
    assert len(saved["runs"]["finished"]) == len(c)  # the diverged and the pending run are not fitted
    pred = saved["prediction"]
    assert abs(pred["chinchilla"]["error"]) < 0.03 and abs(pred["frontier"]["error"]) < 0.03


def test_report_without_a_manifest_names_the_workdir(tmp_path):
    with pytest.raises(ValueError, match="has no manifest.jsonl"):
        report.write_report(str(tmp_path), str(tmp_path / "out"))
