"""Vision tower benchmark: forward + backward images/s, per-frame attention vs one masked block.

  python -m star_jax.bench vision [--sizes shapes,3b] [--batch 32] [--image 64,384] [--repeats 5]

A batch of equal-size images is the common training case. With a concrete layout the tower attends
per frame (`vision._uniform_frame_length`); the baseline, measured in the same run on the same
params and pixels, passes the layout traced, which attends over one [N, N] masked block as the
packed sequence of a batch of mixed sizes must.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from star_jax import sharding
from star_jax.bench.decoder import timed
from star_jax.cli import common
from star_jax.configs import sizes
from star_jax.models import vision, vision_preprocess


def bench_size(name: str, batch: int, image: int, repeats: int) -> dict:
    cfg = vision.VisionConfig.from_dict(sizes.get_size(name)["vision"])
    mesh = sharding.single_device_mesh()
    tower = sharding.create_sharded(lambda: vision.VisionTower(cfg, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)
    side = vision_preprocess.smart_resize(image, image, cfg.patch_size * cfg.spatial_merge_size, 0, 10**9)[0]
    grid = np.tile([[1, side // cfg.patch_size, side // cfg.patch_size]], (batch, 1))
    n = int(grid.prod(-1).sum())
    pixels = jnp.asarray(np.random.RandomState(0).randn(n, cfg.patch_dim).astype(np.float32))
    layout = vision.vision_layout(grid, cfg)
    graphdef, state = nnx.split(tower)

    def loss(state, pixels, layout):
        return jnp.sum(nnx.merge(graphdef, state).encode(pixels, layout).astype(jnp.float32) ** 2)

    grad_concrete = jax.jit(jax.grad(lambda s, p: loss(s, p, layout)))  # layout closed over: concrete
    grad_traced = jax.jit(jax.grad(loss))
    traced = jax.tree.map(jnp.asarray, layout)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        frame_compile, frame_s = timed(grad_concrete, state, pixels, repeats=repeats)
        block_compile, block_s = timed(grad_traced, state, pixels, traced, repeats=repeats)
    return dict(
        size=name,
        image=side,
        tokens_per_image=n // batch,
        per_frame_img_s=batch / frame_s,
        masked_block_img_s=batch / block_s,
        speedup=block_s / frame_s,
        compile_s=frame_compile + block_compile,
    )


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("sizes", "shapes", "comma-separated sizes of configs/sizes.py", flag_values=fv)
    flags.DEFINE_string("image", "64", "image side in px, one per size", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "images per step", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed steps (median reported)", flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    names, images = fv.sizes.split(","), [int(x) for x in fv.image.split(",")]
    if len(images) != len(names):
        common.usage_error(argv[0], f"--image: {len(images)} values for {len(names)} sizes")
    print(f"device: {jax.devices()[0].device_kind}, batch {fv.batch}, forward + backward, median of {fv.repeats}")
    print(f"{'size':<10}{'image':>6}{'tok/img':>8}{'per-frame img/s':>17}{'masked-block img/s':>20}{'speedup':>9}")
    for name, image in zip(names, images):
        r = bench_size(name, fv.batch, image, fv.repeats)
        print(
            f"{r['size']:<10}{r['image']:>6}{r['tokens_per_image']:>8}{r['per_frame_img_s']:>17.1f}"
            f"{r['masked_block_img_s']:>20.1f}{r['speedup']:>8.1f}x"
        )
    return 0
