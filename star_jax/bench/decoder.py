"""Decoder benchmark: prefill and cached-decode throughput, and forward FLOP/s against a matmul peak.

  python -m star_jax.bench decoder [--sizes shapes,ladder_s] [--batch 8] [--prompt 256] [--new 64]

The peak is a large `jnp.dot` measured in the same run on the same device and dtype, so the
fraction says how close the decoder's forward comes to what this machine's matmuls reach.
Compile time is reported apart from steady-state time.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from star_jax import flops, sharding
from star_jax.cli import common
from star_jax.configs import sizes
from star_jax.decode import text
from star_jax.models import qwen2


def timed(fn, *args, repeats: int):
    """(compile seconds, median steady-state seconds) of `fn(*args)` over `repeats` calls."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n `jnp.dot` in `dtype` (f32 accumulation)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    _, t = timed(f, a, b, repeats=repeats)
    return 2 * n**3 / t


def bench_size(name: str, batch: int, prompt: int, new: int, dtype: str, repeats: int) -> dict:
    cfg = qwen2.DecoderConfig.from_dict(sizes.get_size(name)["decoder"], dtype=dtype)
    mesh = sharding.single_device_mesh()
    model = sharding.create_sharded(lambda: qwen2.Decoder(cfg, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids):
        return nnx.merge(graphdef, state)(ids)

    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        prefill_compile, prefill_s = timed(prefill, state, ids, repeats=repeats)
        prompts = np.asarray(ids).tolist()
        # stop id -1 never occurs: every row decodes exactly `new` tokens.
        run = lambda: text.generate_text(model, prompts, max_new_tokens=new, stop_ids=(-1,))
        t0 = time.perf_counter()
        run()
        decode_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        decode_total = (time.perf_counter() - t0) / repeats
    # generate_text = prefill + `new` decode steps; subtract the measured prefill.
    decode_s = max(decode_total - prefill_s, 1e-9)
    fwd_flops = flops.decoder_forward_flops(cfg, batch, prompt)
    return dict(
        size=name,
        params_m=n_params / 1e6,
        prefill_tok_s=batch * prompt / prefill_s,
        decode_tok_s=batch * new / decode_s,
        prefill_flops_s=fwd_flops / prefill_s,
        compile_s=prefill_compile + decode_compile,
    )


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("sizes", "shapes,ladder_s", "comma-separated sizes of configs/sizes.py", flag_values=fv)
    flags.DEFINE_integer("batch", 8, "rows per call", flag_values=fv)
    flags.DEFINE_integer("prompt", 256, "prompt tokens per row", flag_values=fv)
    flags.DEFINE_integer("new", 64, "decoded tokens per row", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed calls (median reported)", flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    peak = matmul_peak(qwen2.to_dtype(fv.dtype))
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), dtype {fv.dtype}")
    print(f"matmul peak (2048^3 jnp.dot, measured now): {peak / 1e9:.1f} GFLOP/s")
    print(f"batch {fv.batch}, prompt {fv.prompt} tokens, {fv.new} decoded tokens per row")
    header = f"{'size':<10} {'params':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'fwd GFLOP/s':>12} {'of peak':>8} {'compile s':>10}"
    print(header)
    print("-" * len(header))
    for name in fv.sizes.split(","):
        r = bench_size(name, fv.batch, fv.prompt, fv.new, fv.dtype, fv.repeats)
        print(
            f"{r['size']:<10} {r['params_m']:>7.1f}M {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.0f} "
            f"{r['prefill_flops_s'] / 1e9:>12.1f} {r['prefill_flops_s'] / peak:>8.1%} {r['compile_s']:>10.1f}"
        )
    return 0
