r"""The shapes-world demo: every STAR stage on this CPU, then exact evaluation.

  star-jax pipeline --config configs/shapes_demo.py --workdir runs/demo
  star-jax pipeline --config configs/shapes_demo.py:quality --workdir runs/quality   # longer

Stage-specific settings live in `config.stage_overrides.<stage>` (merged onto the shared config
when that stage runs); each can be overridden from the command line, e.g.
`--config.stage_overrides.generation.train.num_steps=500`.
"""

import ml_collections

from star_jax.configs import common, star


def get_config(arg=None):
    arg = common.parse_arg(arg, quality=False)
    scale = 4 if arg.quality else 1  # the quality config trains every stage 4x longer
    config = star.get_config("size=shapes,stage=vq")
    config.model.decoder.dtype = "float32"  # CPU: f32 matmuls are faster than emulated bf16
    config.data.vit_image_size = 64
    config.data.max_prompt_len = 48
    config.train.log_every = 25
    config.train.ckpt_every = 200
    config.train.keep_last = 1

    config.pipeline = ml_collections.ConfigDict()
    config.pipeline.stages = ("vq", "understanding", "generation", "editing")
    config.pipeline.eval = ml_collections.ConfigDict(
        dict(per_task=16 * scale, qa=200, edits=48 * scale, cfg=3.0, top_k=0, top_p=1.0, temperature=0.0, seed=0)
    )

    def stage(steps, batch, lr, **extra):
        d = {
            "train": {
                "num_steps": steps * scale,
                "batch_size": batch,
                "lr": lr,
                "warmup_steps": 20,
                "schedule": "cosine",
            }
        }
        for key, value in extra.items():
            d.setdefault(key, {}).update(value)
        return d

    config.stage_overrides = ml_collections.ConfigDict(
        {
            "vq": stage(400, 32, 1e-3),
            "understanding": stage(600, 32, 1e-3),
            "generation": stage(600, 32, 1e-3),
            "editing": stage(300, 16, 5e-4, data={"max_prompt_len": 128}),
        }
    )
    return config
