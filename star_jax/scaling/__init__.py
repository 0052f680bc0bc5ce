"""Scaling-law fits (`fits`), figures (`plots`) and a sweep's report (`report`); the fits are
plain functions of numpy arrays, e.g. `star_jax.scaling.fit_frontier(compute, loss)`."""

from star_jax.scaling.fits import (
    chinchilla_loss,
    chinchilla_optimum,
    fit_chinchilla,
    fit_frontier,
    fit_power,
    frontier_curve,
    isoflop_minima,
)

__all__ = [
    "chinchilla_loss",
    "chinchilla_optimum",
    "fit_chinchilla",
    "fit_frontier",
    "fit_power",
    "frontier_curve",
    "isoflop_minima",
]
