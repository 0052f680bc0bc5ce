"""The CPU scaling ladder: the generation stage on the shapes world, 4 stack depths x 4 compute budgets.

  star-jax sweep --sweep configs/sweeps/cpu_ladder.py --workdir runs/cpu_ladder
  star-jax sweep --sweep configs/sweeps/cpu_ladder.py --workdir runs/cpu_ladder --report

What varies is the stack, what is fixed is everything it reads. STAR's stacked AR layers must have
the base's hidden size (they continue the base's residual stream), so with one base the only size
knob of the trained part is the stack's depth: 1, 2, 4 and 8 layers of width 128 (0.22 M to 1.6 M
non-embedding trainable params). The VQ (the shapes VQ, 64 px -> 8 x 8 codes of 1,024) and the base
(a 2-layer, width-128 decoder with a 2-block ViT, `size=cpu_ladder`) are trained once into
`<workdir>/shared/` (`get_shared`) and every run starts from them, so every run predicts the same
codes from the same frozen features. Budgets are isoFLOP: each depth gets the steps that spend the
budget by the stage's analytic FLOPs per example (frozen VQ encoder and base included), so deeper
stacks see fewer tokens. The stack starts from random init (copying from a 2-layer base cannot fill
8 layers); learning rate, batch and schedule are the same for every run (cosine to 0 over the run,
warm-up a tenth of it).
"""

from star_jax import stages
from star_jax.configs import star
from star_jax.configs.sweeps import hyper

DEPTHS = (1, 2, 4, 8)
BUDGETS = (0.15e12, 0.3e12, 0.6e12, 1.2e12)  # training FLOPs per run
BATCH = 8
LR = 3e-3

COMMON = {
    "model.decoder.dtype": "float32",  # CPU: f32 matmuls are faster than emulated bf16
    "data.vit_image_size": 64,
    "train.log_every": 10,
    "train.ckpt_every": 100,
    "train.keep_last": 1,
}
HELDOUT = {"split": "validation", "num_examples": 256, "batch_size": 64}


def get_shared():
    """The VQ and the base, trained once (into <workdir>/shared) and frozen in every run."""
    vq = {
        "config_arg": "size=cpu_ladder,stage=vq",
        "vq_loss.disc_weight": 0.0,
        "vq_loss.reseed_every": 10,
        "vq_loss.reseed_until": 200,
        "train.batch_size": 16,
        "train.num_steps": 300,
        "train.lr": 2e-3,
        "train.warmup_steps": 10,
    }
    base = {
        "config_arg": "size=cpu_ladder,stage=understanding",
        "data.max_prompt_len": 64,
        "train.batch_size": 16,
        "train.num_steps": 150,
        "train.lr": 1e-3,
        "train.warmup_steps": 10,
    }
    return [COMMON | vq, COMMON | base]


def generation(depth: int) -> dict:
    """Overrides of one stack depth, without its step count."""
    return COMMON | {
        "config_arg": "size=cpu_ladder,stage=generation",
        "data.max_prompt_len": 40,  # the shapes captions' prompts are 25 to 38 tokens
        "model.star.stack_layers": depth,
        "model.star.stack_init": "random",
        "train.init_from": ("stage:{shared}/vq", "stage:{shared}/understanding"),
        "train.batch_size": BATCH,
        "train.lr": LR,
    }


def steps_for(overrides: dict, budget: float) -> int:
    """Steps that spend `budget` FLOPs at the analytic FLOPs per example of `overrides`' config."""
    config = star.get_config(overrides["config_arg"])
    for key, value in overrides.items():
        if key != "config_arg" and "{shared}" not in str(value):
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    per_example = stages.get(config.stage).flops_per_example(config)
    return max(1, round(budget / (per_example * config.train.batch_size)))


def _priority(combo: dict) -> tuple:
    """Run order: the 3 x 3 grid of the three smaller budgets and depths 1, 2, 4 first, then depth 8,
    then the largest budget; smallest budget first inside each block. A sweep stopped early (this
    CPU is shared) leaves whole isoFLOP sets to fit, and the largest budget is what the fit on
    the others predicts."""
    largest = combo["budget"] == max(BUDGETS)
    return (largest, combo["depth"] == max(DEPTHS), combo["budget"], combo["depth"])


def get_sweep():
    """One run per (budget, depth), in `_priority` order; a run's name carries its depth and steps."""
    runs = []
    combos = hyper.product([hyper.sweep("budget", BUDGETS), hyper.sweep("depth", DEPTHS)])
    for combo in sorted(combos, key=_priority):
        overrides = generation(combo["depth"])
        steps = steps_for(overrides, combo["budget"])
        runs.append(overrides | {"train.num_steps": steps, "train.warmup_steps": max(1, min(20, steps // 10))})
    return runs
