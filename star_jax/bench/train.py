"""Generation-stage training step: star_jax's jitted trainer step against the same step in PyTorch.

  python -m star_jax.bench train [--sizes small,115m] [--batch 0] [--prompt 0] [--repeats 3] \
      [--dtype bfloat16] [--torch_threads 1,2] [--floor]

star_jax runs the trainer's own step (`train.make_task` + `train_step.make_train_step` +
`jit_train_step`, the program `star-jax train` compiles) on a config built from configs/star.py
(`size=tiny,stage=generation`) with the model sizes below: frozen base (activations still
backpropagate through it into the adapter), trainable stack + pixel adapter + image head, AdamW
with global-norm clipping, caption dropout 0.1, pre-tokenised image codes (no VQ encoder in the
step). PyTorch runs `star_jax.bench.torch_train`: the same weights in transformers `Qwen2Model`s
(sdpa attention), the same loss, `torch.optim.AdamW` on the trainable parts, the same compute
dtype (bf16 through `torch.autocast`, params f32). Both see the same batch: random prompts of
`prompt` tokens (no padding) followed by `N` image tokens, 1-D positions.

Calls alternate (star_jax, torch at each thread count, star_jax, ...) so load drift on a shared
machine hits every side; tokens/s = batch x (prompt + N) / the median seconds of one step. The
PyTorch side is reported at its fastest thread count (each in `--torch_threads` is measured).
FLOP/s count the work the step needs: 2x the base's forward (no weight gradients for a frozen
base, only activation gradients) + 3x the stack, adapter and head; "of peak" divides by a
2048^3 `jnp.dot` in the compute dtype (f32 accumulation) measured in the same run.

Sizes (image tokens = the VQ grid squared; LM params = base + stack + adapter + head):
  tiny   configs/sizes.py `tiny` (hidden 64, 4 + 2 layers, 64 codes, 64 image tokens), for tests
  small  hidden 128, 6 base + 2 stack layers, 1,024 codes, 64 image tokens: ~2 M
  115m   hidden 768 (12 / 4 heads, FFN 2,048), 12 base + 4 stack layers, 16,384 codes, 576 image
         tokens (24 x 24, the STAR-VQ grid): ~115 M
  1b     hidden 2048 (16 / 2 heads of 128, FFN 5,504), 16 base + 4 stack layers, the Qwen vocabulary,
         65,536 x 512 codebook, 576 image tokens: ~1.3 B (1.0 B outside the token table), for
         accelerators (launch/gpu_check.sh; `--notorch`)

`--notorch` times star_jax alone (an accelerator run: the PyTorch side is a CPU program here).
"MFU" divides by the device's spec bf16 peak where `metrics.PEAK_FLOPS` knows the device.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from star_jax import flops, metrics, optim, sharding, stages, train, train_step
from star_jax.bench import generate as generate_bench
from star_jax.bench import matmul_floor, torch_reference, torch_train
from star_jax.bench.decoder import matmul_peak
from star_jax.cli import common
from star_jax.configs import sizes
from star_jax.configs import star as star_config
from star_jax.models import qwen2

# name -> (decoder block, star block, VQ image size, codebook size, codebook dim, default batch, default prompt)
BENCH_SIZES = {
    "tiny": (sizes.SIZES["tiny"]["decoder"], dict(stack_layers=2, adapter_depth=2), 32, 64, 8, 2, 16),
    "small": (sizes._decoder(128, 6, 4, 2, 512, sizes.SHAPES_VOCAB, tie=True), dict(stack_layers=2, adapter_depth=2))
    + (32, 1024, 32, 8, 32),
    "115m": (sizes._decoder(768, 12, 12, 4, 2048, sizes.SHAPES_VOCAB, tie=True), dict(stack_layers=4, adapter_depth=2))
    + (96, 16384, 64, 4, 64),
    "1b": (
        sizes._decoder(2048, 16, 16, 2, 5504, sizes.QWEN_VOCAB_3B, head_dim=128, tie=True, mrope=(16, 24, 24)),
        dict(stack_layers=4, adapter_depth=2),
    )
    + (96, 65536, 512, 16, 64),
}


def bench_config(
    size: str,
    *,
    batch: int = 0,
    prompt: int = 0,
    dtype: str = "bfloat16",
    caption_dropout: float = 0.1,
    scan_layers: bool = True,
):
    """The generation config of bench size `size` (configs/star.py with the model blocks replaced).

    batch / prompt 0 take the size's defaults; the VQ is a small conv stack (it does not run in
    the step: codes come pre-tokenised) with the size's codebook and image grid.
    """
    if size not in BENCH_SIZES:
        raise ValueError(f"--sizes: {size!r} is not one of {', '.join(BENCH_SIZES)}")
    decoder, star_block, image_size, codes, code_dim, default_batch, default_prompt = BENCH_SIZES[size]
    config = star_config.get_config("size=tiny,stage=generation")
    config.model.decoder.update(decoder)
    config.model.decoder.dtype = dtype
    config.model.decoder.scan_layers = scan_layers
    config.model.star.update(star_block)
    config.model.star.caption_dropout = caption_dropout
    config.model.vq = sizes._vq(image_size, 16, (1, 2, 2), 16, codes, code_dim, res_blocks=1, heads=2, groups=8)
    config.data.pretokenized = True
    config.data.max_prompt_len = prompt or default_prompt
    config.train.batch_size = batch or default_batch
    config.train.warmup_steps = 1  # the learning rate is irrelevant to the timing; keep updates non-zero
    return config


def synthetic_batch(config, seed: int = 0) -> dict:
    """batch_size random prompts of max_prompt_len ids (no padding) with their unconditional rows,
    1-D positions [B, 3, Tp + N] and random image codes [B, N] int32 (numpy)."""
    n = stages.num_image_tokens(config)
    b, tp = config.train.batch_size, config.data.max_prompt_len
    batch = generate_bench.synthetic_batch(b, tp, n, config.model.decoder.vocab_size, seed=seed)
    del batch["seeds"]
    rng = np.random.RandomState(seed + 1)
    batch["codes"] = rng.randint(0, config.model.vq.codebook_size, (b, n)).astype(np.int32)
    return batch


def step_flops(config) -> float:
    """FLOPs one step needs: 2x the base forward (activation gradients only) + 3x stack, adapter, head."""
    cfg = qwen2.DecoderConfig.from_dict(config.model.decoder)
    b, tp = config.train.batch_size, config.data.max_prompt_len
    n = stages.num_image_tokens(config)
    t = tp + n - 1
    base = flops.decoder_forward_flops(cfg, b, t, head=False)
    stack = flops.decoder_forward_flops(cfg, b, t, num_layers=config.model.star.stack_layers, head=False)
    d, c = cfg.hidden_size, config.model.vq.codebook_dim
    adapter = 2.0 * b * (n - 1) * (c * d + (config.model.star.adapter_depth - 1) * d * d)
    head = 2.0 * b * n * d * config.model.vq.codebook_size
    return 2.0 * base + 3.0 * (stack + adapter + head)


class JaxStep:
    """The trainer's jitted generation step on one device, holding its state between calls."""

    def __init__(self, config):
        self.config = config
        self.mesh = sharding.single_device_mesh()
        self.rules = sharding.rules_from_config(config)
        task = train.make_task(config)
        model = sharding.create_sharded(task.build_model, self.mesh, self.rules)
        self.model = model
        with sharding.use_mesh(self.mesh, self.rules):
            graphdef, params, frozen, other = optim.split_trainable(model, list(config.train.trainable))
            params, frozen, other = (s.to_pure_dict() for s in (params, frozen, other))
            tx = optim.make_optimizer(config.train)
            opt_state = jax.jit(tx.init, out_shardings=train_step.opt_state_shardings(tx, params, self.mesh))(params)
            state = {"params": params, "opt_state": opt_state, "other": other}
            step_fn = train_step.task_step(task, graphdef, tx, config.train)
            self.jitted = train_step.jit_train_step(step_fn, state, frozen)
        self.params, self.frozen, self.other, self.opt_state = params, frozen, other, opt_state
        self.trainable = sum(x.size for x in jax.tree.leaves(params))
        self.step = 0
        self.rng = jax.random.key(config.seed)

    def put(self, batch: dict) -> dict:
        """numpy batch -> arrays on the bench device."""
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return {k: jax.device_put(np.asarray(v), replicated) for k, v in batch.items()}

    def hlo(self, batch: dict) -> str:
        """The optimised HLO text of the step for a `put` batch."""
        with sharding.use_mesh(self.mesh, self.rules):
            args = (self.params, self.frozen, self.other, self.opt_state, batch, self.rng, jnp.int32(0))
            return self.jitted.lower(*args).compile().as_text()

    def __call__(self, batch: dict) -> float:
        """One step on a `put` batch; returns the loss (float, blocks until the step is done)."""
        with sharding.use_mesh(self.mesh, self.rules):
            self.params, self.other, self.opt_state, out = self.jitted(
                self.params,
                self.frozen,
                self.other,
                self.opt_state,
                batch,
                jax.random.fold_in(self.rng, self.step),
                jnp.int32(self.step),
            )
        self.step += 1
        return float(out["loss"])


def lm_params(config) -> int:
    """Base + stack + adapter + head parameters of `config` (from shapes)."""
    cfg = qwen2.DecoderConfig.from_dict(config.model.decoder)
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    layer = d * (h + 2 * kv) * hd + (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d
    layers = cfg.num_layers + config.model.star.stack_layers
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    c, k = config.model.vq.codebook_dim, config.model.vq.codebook_size
    adapter = c * d + d + (config.model.star.adapter_depth - 1) * (d * d + d)
    return layers * layer + 2 * d + embed + adapter + d * k + k


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(name: str, fv) -> dict:
    """Times the star_jax and (unless `--notorch`) PyTorch steps of size `name`, alternating calls;
    `fv`: main's flags."""
    config = bench_config(name, batch=fv.batch, prompt=fv.prompt, dtype=fv.dtype, scan_layers=fv.scan_layers)
    batch = synthetic_batch(config)
    jax_step = JaxStep(config)
    threads = [int(t) for t in fv.torch_threads.split(",")] if fv.torch else []
    torch_step = torch_batch = None
    if threads:
        ref = torch_train.trainable_generation_model(jax_step.model)
        torch_step = torch_train.TrainStep(
            ref, config.train, dtype=fv.dtype, caption_dropout=config.model.star.caption_dropout, seed=config.seed
        )
        torch_batch = torch_train.to_torch_batch(batch)
    del jax_step.model  # the step holds its own params (and the torch model a copy)
    jax_batch = jax_step.put(batch)
    previous = torch_reference.set_num_threads(threads[0]) if threads else None
    first = _seconds(lambda: jax_step(jax_batch))
    for n in threads:  # warm-up: first-call allocations, not timed
        torch_reference.set_num_threads(n)
        torch_step(torch_batch)
    jax_times, torch_times = [], {n: [] for n in threads}
    losses = {"jax": [], "torch": []}
    for _ in range(fv.repeats):
        t0 = time.perf_counter()
        losses["jax"].append(jax_step(jax_batch))
        jax_times.append(time.perf_counter() - t0)
        for n in threads:
            torch_reference.set_num_threads(n)
            t0 = time.perf_counter()
            losses["torch"].append(torch_step(torch_batch))
            torch_times[n].append(time.perf_counter() - t0)
    if previous is not None:
        torch_reference.set_num_threads(previous)
    seq = config.data.max_prompt_len + batch["codes"].shape[1]
    tokens = config.train.batch_size * seq
    out = dict(
        size=name,
        lm_params=lm_params(config),
        trainable=jax_step.trainable,
        batch=config.train.batch_size,
        seq=seq,
        tokens=tokens,
        flops=step_flops(config),
        jax_s=float(np.median(jax_times)),
        jax_times=jax_times,
        compile_s=max(first - min(jax_times), 0.0),
        losses=losses,
        torch_times=torch_times,
    )
    out["jax_tok_s"] = tokens / out["jax_s"]
    if fv.floor:
        if fv.scan_layers:  # a scan body appears once in the HLO: count the matmuls of all layers
            del jax_step  # its state is not needed any more
            jax_step = JaxStep(bench_config(name, batch=fv.batch, prompt=fv.prompt, dtype=fv.dtype, scan_layers=False))
            del jax_step.model
        out["floor"] = matmul_floor.matmul_floor(jax_step.hlo(jax_step.put(batch)))
    if threads:
        best = min(threads, key=lambda n: np.median(torch_times[n]))
        out["torch_threads"] = best
        out["torch_s"] = float(np.median(torch_times[best]))
        out["torch_tok_s"] = tokens / out["torch_s"]
        out["torch_tok_s_by_threads"] = {n: tokens / float(np.median(t)) for n, t in torch_times.items()}
    return out


def spec_peak() -> float | None:
    """The device's spec bf16 peak FLOP/s from `metrics.PEAK_FLOPS`, or None (a CPU)."""
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in metrics.PEAK_FLOPS.items() if kind.startswith(name)), None)


def _print_result(r: dict, peak: float, spec: float | None) -> None:
    jax_frac = r["flops"] / r["jax_s"] / peak
    mfu = f" {r['flops'] / r['jax_s'] / spec:>6.1%}" if spec else f" {'-':>6}"
    lead = (
        f"{r['size']:<6} {r['lm_params'] / 1e6:>9.1f}M {r['trainable'] / 1e6:>9.1f}M "
        f"{r['batch']:>4} x {r['seq']:<5} {r['jax_tok_s']:>15.0f}"
    )
    if "torch_s" in r:
        print(
            f"{lead} {r['torch_tok_s']:>12.0f} {r['torch_threads']:>7} {r['jax_tok_s'] / r['torch_tok_s']:>8.2f}x "
            f"{jax_frac:>12.1%} {r['flops'] / r['torch_s'] / peak:>14.1%}{mfu} {r['compile_s']:>10.1f}",
            flush=True,
        )
    else:
        print(
            f"{lead} {'-':>12} {'-':>7} {'-':>9} {jax_frac:>12.1%} {'-':>14}{mfu} {r['compile_s']:>10.1f}", flush=True
        )
    times = f"seconds per step: star_jax {', '.join(f'{t:.3f}' for t in r['jax_times'])}"
    for n, ts in r["torch_times"].items():
        times += f"; torch {n} thread(s) {', '.join(f'{t:.3f}' for t in ts)}"
    print(f"{'':<6} step {r['flops'] / 1e9:.1f} GFLOP; {times}", flush=True)
    if "torch_s" in r:
        by_threads = ", ".join(f"{n} thread(s) {v:.0f}" for n, v in r["torch_tok_s_by_threads"].items())
        print(f"{'':<6} torch tok/s by threads: {by_threads}; the fastest is reported", flush=True)
    if "floor" in r:
        fl = r["floor"]
        need = f"; 2x the PyTorch step is {r['torch_s'] / 2:.3f} s" if "torch_s" in r else ""
        print(
            f"{'':<6} matmul floor: the step's {sum(n for _, n, _ in fl.rows)} matmuls ({len(fl.rows)} shapes, "
            f"{fl.flops / 1e9:.1f} GFLOP), each timed alone, take {fl.seconds:.3f} s "
            f"({fl.flops / fl.seconds / 1e9:.0f} GFLOP/s) of the {r['jax_s']:.3f} s step{need}",
            flush=True,
        )
        for dot, n, sec in fl.rows[:6]:
            print(f"{'':<8} {n:>3} x {sec * 1e3:7.1f} ms  {dot.flops / sec / 1e9:5.0f} GFLOP/s  {dot}", flush=True)
    losses = f"losses: star_jax {', '.join(f'{x:.3f}' for x in r['losses']['jax'])}"
    if r["losses"]["torch"]:
        losses += f"; torch {', '.join(f'{x:.3f}' for x in r['losses']['torch'])}"
    print(f"{'':<6} {losses}", flush=True)


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("sizes", "small,115m", f"comma-separated bench sizes: {', '.join(BENCH_SIZES)}", flag_values=fv)
    flags.DEFINE_integer("batch", 0, "sequences per step, both sides; 0 = the size's default", flag_values=fv)
    flags.DEFINE_integer("prompt", 0, "prompt tokens before the image tokens; 0 = the size's default", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed steps per side (alternating; median reported)", flag_values=fv)
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "compute dtype of both sides", flag_values=fv)
    flags.DEFINE_bool("scan_layers", True, "config.model.decoder.scan_layers (False: layers unrolled)", flag_values=fv)
    flags.DEFINE_bool(
        "floor",
        False,
        "also time each matmul of the step alone (star_jax.bench.matmul_floor): the step time the "
        "backend's matmul kernels allow with no other work",
        flag_values=fv,
    )
    flags.DEFINE_bool("torch", True, "also time the PyTorch step (--notorch: star_jax alone)", flag_values=fv)
    flags.DEFINE_string(
        "torch_threads", "1,2", "torch intra-op thread counts to measure; the fastest is reported", flag_values=fv
    )
    common.parse_flags(fv, argv, __doc__)
    prog = argv[0] if argv else "star-jax bench train"
    names = fv.sizes.split(",")
    for name in names:
        if name not in BENCH_SIZES:
            return common.error(prog, f"--sizes: {name!r} is not one of {', '.join(BENCH_SIZES)}")
    for flag in ("batch", "prompt"):
        if fv[flag].value < 0:
            return common.error(prog, f"--{flag}={fv[flag].value} must be >= 0")
    if fv.repeats < 1:
        return common.error(prog, f"--repeats={fv.repeats} must be >= 1")
    try:
        threads = [int(t) for t in fv.torch_threads.split(",")]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        return common.error(prog, f"--torch_threads={fv.torch_threads!r} must be positive integers, e.g. 1,2")
    peaks = {dt: matmul_peak(qwen2.to_dtype(dt)) for dt in ("float32", "bfloat16")}
    spec = spec_peak()
    torch_part = f"torch threads {fv.torch_threads} measured" if fv.torch else "PyTorch not timed"
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable); compute {fv.dtype}, params float32, scan_layers "
        f"{fv.scan_layers}; {torch_part}; {fv.repeats} alternating steps per side"
    )
    print(
        f"matmul peak (2048^3 jnp.dot, f32 accumulation, measured now): float32 {peaks['float32'] / 1e9:.0f} "
        f"GFLOP/s, bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s"
        + (f"; spec bf16 peak {spec / 1e12:.0f} TFLOP/s (MFU)" if spec else "")
    )
    peak = peaks[fv.dtype]
    header = (
        f"{'size':<6} {'LM params':>10} {'trainable':>10} {'batch x seq':>12} {'star_jax tok/s':>15} "
        f"{'torch tok/s':>12} {'threads':>7} {'speed-up':>9} {'jax of peak':>12} {'torch of peak':>14} "
        f"{'MFU':>6} {'compile s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        _print_result(bench_size(name, fv), peak, spec)
    return 0
