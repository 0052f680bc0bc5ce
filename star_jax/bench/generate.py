"""Text-to-image decode benchmark: star_jax `generate_codes` against the PyTorch reference loop.

  python -m star_jax.bench generate [--sizes shapes,star_100m] [--batch 4] [--tokens 0] [--repeats 3] \
      [--torch_threads 1,2]

Both sides run the same random weights (star_jax -> mapping table -> transformers Qwen2 layers,
`star_jax.bench.torch_reference`), float32, the same n synthetic prompts (CFG pairs: 2n rows) and
exactly N image tokens (default: the size's VQ grid, 64 for `shapes`), sampling with the
reference demo's settings (cfg 1.1, top-k 1000, top-p 0.8) unless told otherwise. Calls alternate
(jax, torch, jax, ...) so load drift on a shared machine hits both; images/s = n / the median
seconds of one call, `best/best` the ratio of the fastest calls. star_jax's compile time is
reported apart (first call minus the fastest steady call); the torch loop has no compile step
(a 2-token warm-up call is made at each thread count and not timed). The reference runs at its
fastest setting on the machine: each of `--torch_threads` (default 1 and 2 intra-op threads) is
timed in the same alternation and the fastest median is the one compared against.

Sizes: those of configs/sizes.py (`shapes`), plus `star_100m`, defined here: the ladder_s shape
(hidden 512, 8 / 2 heads, FFN 1536) with 14 base + 7 stack layers, a 65,536 x 512 codebook and
head, the shapes-world vocabulary and 16 x 16 = 256 image tokens: ~98 M LM parameters (base +
stack + adapter + head) plus the 33.6 M frozen codebook (a lookup). Its VQ encoder/decoder are
tiny: they play no part in decoding.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from star_jax import sharding
from star_jax.bench import torch_reference
from star_jax.cli import common
from star_jax.configs import sizes
from star_jax.decode import generate
from star_jax.models import qwen2, star, vq
from star_jax.text import chat

DECODE_COMPONENTS = ("base", "vq", "stacked_ar", "pixel_adapter", "image_head")

BENCH_SIZES = {
    "star_100m": dict(
        decoder=sizes._decoder(512, 14, 8, 2, 1536, sizes.SHAPES_VOCAB, tie=True),
        star=dict(stack_layers=7, adapter_depth=2),
        vq=sizes._vq(256, 32, (1, 1, 2, 2, 4), 64, 65536, 512, res_blocks=1, heads=4, groups=8),
    ),
}


def size_blocks(name: str) -> dict:
    """The decoder / star / vq blocks of a size of configs/sizes.py or of BENCH_SIZES."""
    return BENCH_SIZES[name] if name in BENCH_SIZES else sizes.get_size(name)


def image_tokens(vq_cfg: vq.VQConfig) -> int:
    """VQ codes per image: grid_size^2."""
    return vq_cfg.grid_size**2


def _random_value(path: str, shape: tuple[int, ...], dtype, rng: np.random.Generator) -> np.ndarray:
    """O(1)-activation random weights: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.1^2), tables ~ N(0, 1); non-float variables zero."""
    if not np.issubdtype(np.dtype(dtype), np.floating):
        return np.zeros(shape, dtype)
    name = path.rsplit("/", 1)[-1]
    stacked = "/layers/" in f"/{path}/"
    inner = shape[1:] if stacked else shape
    normal = rng.standard_normal(shape, np.float32)
    if name == "scale":
        value = 1.0 + 0.1 * normal
    elif name.endswith("bias"):
        value = 0.1 * normal
    elif name in ("q_kernel", "k_kernel", "v_kernel"):
        value = normal / math.sqrt(inner[0])
    elif name.endswith("kernel"):
        value = normal / math.sqrt(math.prod(inner[:-1]))
    else:  # embedding tables, the codebook
        value = normal
    return value.astype(dtype)


def random_star(name: str, *, seed: int = 0, dtype: str = "float32") -> star.Star:
    """A STAR of size `name` with the decode components only, filled with numpy random weights.

    Building abstractly and filling from numpy skips compiling the initialisers, which on a
    shared CPU takes longer than the benchmark itself.
    """
    blocks = size_blocks(name)
    decoder_cfg = qwen2.DecoderConfig.from_dict(blocks["decoder"], dtype=dtype, param_dtype="float32")
    star_cfg = star.StarConfig.from_dict(blocks["star"])
    vq_cfg = vq.VQConfig.from_dict(blocks["vq"])
    mesh = sharding.single_device_mesh()
    rng = np.random.default_rng(seed)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, abstract = nnx.get_abstract_model(
            lambda: star.Star(decoder_cfg, star_cfg, vq_cfg=vq_cfg, components=DECODE_COMPONENTS, rngs=nnx.Rngs(0)),
            mesh,
        )
        flat = nnx.to_flat_state(abstract)
        for path, var in flat:
            a = var.get_value()
            value = _random_value("/".join(map(str, path)), tuple(a.shape), a.dtype, rng)
            var.set_value(jax.device_put(value, a.sharding))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))


def synthetic_batch(n: int, prompt_len: int, num_tokens: int, vocab: int, *, seed: int = 0) -> dict:
    """n prompts of `prompt_len` random ids (no padding) with their CFG rows; 1-D positions."""
    rng = np.random.RandomState(seed)
    ids = [rng.randint(10, vocab, prompt_len).tolist() for _ in range(n)]
    uncond = [list(chat.unconditional_ids(row, fim_pad=3)) for row in ids]
    positions = np.broadcast_to(np.arange(prompt_len + num_tokens), (n, 3, prompt_len + num_tokens))
    return {
        "prompt_ids": np.asarray(ids, np.int32),
        "uncond_ids": np.asarray(uncond, np.int32),
        "prompt_mask": np.ones((n, prompt_len), bool),
        "positions": positions.astype(np.int32),
        "seeds": np.arange(n, dtype=np.int32),
    }


def bench_size(name: str, args) -> dict:
    """Times star_jax and the reference loop on the same weights and prompts, alternating calls
    (jax, torch, jax, torch, ...) so that load drift on a shared machine hits both sides alike.
    `args`: the parsed flags of `main`."""
    model = random_star(name)
    n_tokens = args.tokens or image_tokens(model.vq_cfg)
    lm_params = sum(star.count_params(getattr(model, c)) for c in ("base", "stacked_ar", "pixel_adapter", "image_head"))
    # Read at every image token: all of those but the base's token embedding (image tokens enter
    # through the codebook and adapter; no text logits are computed).
    streamed_bytes = 4 * (lm_params - math.prod(model.base.embedding.get_value().shape))
    codebook = math.prod(model.vq.quantize.embedding.get_value().shape)
    data = synthetic_batch(args.batch, args.prompt, n_tokens, model.decoder_cfg.vocab_size)
    sample = torch_reference.SampleConfig(args.cfg, args.temperature, args.top_k, args.top_p)
    kw = dict(num_tokens=n_tokens, cfg_weight=sample.cfg_weight, temperature=sample.temperature)
    kw |= dict(top_k=sample.top_k, top_p=sample.top_p)
    ref = torch_reference.TorchStar.from_star(model)
    threads = thread_counts(args.torch_threads)
    previous = torch_reference.set_num_threads(threads[0])

    def run_jax():
        jax.block_until_ready(generate.generate_codes(model, data, **kw))

    def run_torch():
        torch_reference.generate_codes(ref, data, num_tokens=n_tokens, sample=sample)

    first = _seconds(run_jax)
    for n in threads:  # warm-up at each thread count, not timed
        torch_reference.set_num_threads(n)
        torch_reference.generate_codes(ref, data, num_tokens=2, sample=sample)
    jax_times, by_threads = [], {n: [] for n in threads}
    for _ in range(args.repeats):
        jax_times.append(_seconds(run_jax))
        for n in threads:
            torch_reference.set_num_threads(n)
            by_threads[n].append(_seconds(run_torch))
    torch_reference.set_num_threads(previous)
    best = min(threads, key=lambda n: np.median(by_threads[n]))
    torch_times = by_threads[best]
    jax_s, torch_s = float(np.median(jax_times)), float(np.median(torch_times))
    return dict(
        size=name,
        lm_params_m=lm_params / 1e6,
        codebook_m=codebook / 1e6,
        tokens=n_tokens,
        jax_img_s=args.batch / jax_s,
        torch_img_s=args.batch / torch_s,
        best_ratio=min(torch_times) / min(jax_times),
        jax_times=jax_times,
        torch_times=torch_times,
        torch_threads=best,
        torch_img_s_by_threads={n: args.batch / float(np.median(t)) for n, t in by_threads.items()},
        compile_s=max(first - min(jax_times), 0.0),
        streamed_mib=streamed_bytes / 2**20,
        streamed_bytes=streamed_bytes,
    )


def thread_counts(text: str) -> list[int]:
    """`--torch_threads` "1,2" -> [1, 2]; a ValueError naming the flag unless positive integers."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--torch_threads={text!r} must be positive integers, e.g. 1,2")
    return counts


def weight_stream_bandwidth(rows: int, *, mib: int = 256, repeats: int = 3) -> float:
    """Bytes/s at which this machine streams float32 weights through `rows`-row matmuls.

    Decoding one token reads every weight once and does little work per byte, so this is the
    decode roofline: [rows, 2048] @ [2048, 4096] kernels, `mib` MiB in all (far beyond the
    last-level cache), one jitted call, best of `repeats`.
    """
    import jax.numpy as jnp

    n = max(mib // 32, 1)
    weights = [jnp.full((2048, 4096), 1e-4 * (i + 1), jnp.float32) for i in range(n)]
    x = jnp.ones((rows, 2048), jnp.float32)

    @jax.jit
    def stream(x, weights):
        for w in weights:
            x = x + (x @ w)[:, :2048] * 1e-3
        return x

    jax.block_until_ready(stream(x, weights))
    best = min(_seconds(lambda: jax.block_until_ready(stream(x, weights))) for _ in range(repeats))
    return n * 2048 * 4096 * 4 / best


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string(
        "sizes", "shapes,star_100m", "comma-separated sizes (configs/sizes.py, BENCH_SIZES)", flag_values=fv
    )
    flags.DEFINE_integer("batch", 4, "images per call (2x rows with CFG), both sides", flag_values=fv)
    flags.DEFINE_integer("tokens", 0, "image tokens per image; 0 = the size's VQ grid", flag_values=fv)
    flags.DEFINE_integer("prompt", 32, "prompt tokens", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed calls per side (alternating; median reported)", flag_values=fv)
    flags.DEFINE_float("cfg", 1.1, "guidance weight (reference demo: 1.1)", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "0 = greedy", flag_values=fv)
    flags.DEFINE_integer("top_k", 1000, "reference demo: 1000", flag_values=fv)
    flags.DEFINE_float("top_p", 0.8, "reference demo: 0.8", flag_values=fv)
    flags.DEFINE_string(
        "torch_threads",
        "1,2",
        "torch intra-op thread counts, each measured (alternating with star_jax); the fastest is reported",
        flag_values=fv,
    )
    for name in ("top_k", "top_p", "torch_threads"):  # the spellings of earlier versions
        flags.DEFINE_alias(name.replace("_", "-"), name, flag_values=fv)
    common.parse_flags(fv, argv, __doc__)
    try:
        thread_counts(fv.torch_threads)
    except ValueError as e:
        return common.error(argv[0] if argv else "star-jax bench generate", e)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
        f"torch threads {fv.torch_threads} measured (fastest reported), float32, batch {fv.batch} images "
        f"({2 * fv.batch} CFG rows), prompt {fv.prompt} tokens, cfg {fv.cfg}, temperature "
        f"{fv.temperature}, top-k {fv.top_k}, top-p {fv.top_p}, {fv.repeats} alternating calls per side"
    )
    header = (
        f"{'size':<10} {'LM params':>10} {'codebook':>9} {'tokens':>6} {'star_jax img/s':>15} "
        f"{'torch ref img/s':>16} {'threads':>7} {'speed-up':>9} {'best/best':>10} {'jax compile s':>14}"
    )
    bandwidth = weight_stream_bandwidth(2 * fv.batch)
    print(header)
    print("-" * len(header))
    for name in fv.sizes.split(","):
        r = bench_size(name, fv)
        print(
            f"{r['size']:<10} {r['lm_params_m']:>9.1f}M {r['codebook_m']:>8.1f}M {r['tokens']:>6} "
            f"{r['jax_img_s']:>15.3f} {r['torch_img_s']:>16.3f} {r['torch_threads']:>7} {r['jax_img_s'] / r['torch_img_s']:>8.2f}x "
            f"{r['best_ratio']:>9.2f}x {r['compile_s']:>14.1f}",
            flush=True,
        )
        print(
            f"{'':<10} seconds per call: star_jax {', '.join(f'{t:.2f}' for t in r['jax_times'])}; "
            f"torch ({r['torch_threads']} thread(s)) {', '.join(f'{t:.2f}' for t in r['torch_times'])}; torch img/s "
            f"by threads: {', '.join(f'{n}: {v:.3f}' for n, v in r['torch_img_s_by_threads'].items())}",
            flush=True,
        )
        roofline = fv.batch / (r["tokens"] * r["streamed_bytes"] / bandwidth)
        print(
            f"{'':<10} weight-bandwidth roofline: {r['streamed_mib']:.0f} MiB read per token at "
            f"{bandwidth / 2**30:.1f} GiB/s (measured above) -> {roofline:.3f} img/s; star_jax at "
            f"{r['jax_img_s'] / roofline:.0%}, torch at {r['torch_img_s'] / roofline:.0%}: no decoder "
            f"can beat the reference by more than {roofline / r['torch_img_s']:.1f}x here",
            flush=True,
        )
    return 0
