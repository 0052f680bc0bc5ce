"""The pod scaling ladder: every `ladder_*` size of the generation stage at compute-matched budgets.

  star-jax sweep --sweep configs/sweeps/ladder.py --workdir /runs/ladder --dry-run
  star-jax sweep --sweep configs/sweeps/ladder.py --workdir /runs/ladder --print_commands
  star-jax sweep --sweep configs/sweeps/ladder.py --workdir /runs/ladder --aot v5p-128

Real vocabulary (Qwen2.5, 151,936) and STAR-VQ (576 codes of 65,536 per 384 px image). Each
(size, budget) gets the steps that spend the budget at the stage's analytic FLOPs per example
(`star_jax/stages.py`: frozen base with activation gradients, trained stack, adapter and head;
codes pre-tokenised, so no VQ encoder in the step), at a global batch of 256. Points with fewer
than MIN_STEPS steps are left out (warm-up alone would decide them). Every run reads the same
pre-tokenised pairs and starts from its size's trained base and the one STAR-VQ:

  STAR_LADDER_DATA   ArrayRecord pairs with VQ codes (data/pretokenize_vq.py), default /data/ladder_pairs_vq
  STAR_LADDER_BASES  directory of trained bases, <dir>/<size>/understanding, default /runs/ladder_bases
  STAR_VQ            the STAR-VQ weights (reference layout), default /ckpt/star-vq.safetensors
"""

import os

from star_jax import stages
from star_jax.configs import sizes, star

BUDGETS = (1e18, 3e18, 1e19)  # training FLOPs per run
BATCH = 256
LR = 3e-4
MIN_STEPS = 1000
DATA = os.environ.get("STAR_LADDER_DATA", "/data/ladder_pairs_vq")
BASES = os.environ.get("STAR_LADDER_BASES", "/runs/ladder_bases")
VQ = os.environ.get("STAR_VQ", "/ckpt/star-vq.safetensors")
HELDOUT = {"split": "validation", "num_examples": 2048, "batch_size": 256}


def overrides(size: str) -> dict:
    """The overrides of one ladder size, without its step count."""
    return {
        "config_arg": f"size={size},stage=generation",
        "data.source": "arrayrecord",
        "data.path": DATA,
        "data.pretokenized": True,
        "data.max_prompt_len": 128,
        "train.init_from": (f"stage:{BASES}/{size}/understanding", f"vq:{VQ}"),
        "train.batch_size": BATCH,
        "train.lr": LR,
        "train.ckpt_every": 1000,
    }


def steps_for(size: str, budget: float) -> int:
    """Steps of `size` that spend `budget` FLOPs."""
    config = star.get_config(f"size={size},stage=generation")
    config.data.pretokenized = True
    config.data.max_prompt_len = 128
    return round(budget / (stages.get("generation").flops_per_example(config) * BATCH))


def get_sweep():
    """One run per (budget, size) with at least MIN_STEPS steps, smallest budget first."""
    runs = []
    for budget in BUDGETS:
        for size in (name for name in sizes.SIZES if name.startswith("ladder_")):
            steps = steps_for(size, budget)
            if steps >= MIN_STEPS:
                runs.append(
                    overrides(size)
                    | {
                        "name": f"{size}-C{budget:.0e}",
                        "train.num_steps": steps,
                        "train.warmup_steps": min(500, steps // 10),
                    }
                )
    return runs
