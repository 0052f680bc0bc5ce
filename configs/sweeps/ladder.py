"""Scaling-ladder sweep: every ladder size of the generation stage at a compute-matched step count.

`star-jax sweep --sweep configs/sweeps/ladder.py` expands it; each entry is a dict of overrides
(`config_arg` is the `get_config` argument, the rest are dotted config keys).
"""

from star_jax.configs import sizes

# Tokens per step are fixed by the batch; larger sizes get proportionally fewer steps so that
# each point of the ladder costs about the same compute (a scaling-law sweep's x-axis).
BASE_STEPS = 20_000


def get_sweep():
    """List of override dicts, one per run."""
    ladder = [name for name in sizes.SIZES if name.startswith("ladder_")]
    runs = []
    for i, size in enumerate(ladder):
        for lr in (1e-4, 3e-4):
            runs.append(
                {
                    "config_arg": f"size={size},stage=generation",
                    "train.num_steps": BASE_STEPS // (2**i),
                    "train.lr": lr,
                }
            )
    return runs
