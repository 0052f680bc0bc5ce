"""Stage -> `train.Task`: which model components, which objective, which input, where params
start from. Everything stage-specific that is not plain config lives here, in one table-like
function, so `train.py` stays stage-agnostic.

`config.train.init_from` lists sources applied in order (later ones win for the params they hold):
  "<stage>"          the final params of an earlier stage under the same workdir
  "stage:<dir>"      the final params of the stage saved in <dir> (`<other workdir>/<stage>`),
                     e.g. a finished vision stage of another run, to start a variant from it
  "hf:<dir>"         a Hugging Face Qwen2.5-VL / Qwen2 directory -> base (and vision)
  "vq:<file>"        reference VQ weights (.safetensors) -> vq
After loading, a generation stage whose stack was not loaded copies it from the base's last N
layers (`model.star.stack_init = "copy_last"`).
"""

from __future__ import annotations

import logging
import os

import jax
from flax import nnx

from star_jax import checkpointing, objectives
from star_jax.models import star, vq


def param_targets(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat path -> current param array (its shape, dtype and sharding are restore targets)."""
    return checkpointing.flatten(nnx.state(model, nnx.Param).to_pure_dict())


def load_from_stage(model: nnx.Module, workdir: str, stage: str) -> set[str]:
    """Loads every param of `model` that stage `stage` saved (frozen + newest trainable). Returns
    the flat paths loaded. Raises if the stage has no checkpoint."""
    ckpts = checkpointing.StageCheckpoints(workdir, stage, read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"stage {stage!r} has no checkpoint under {ckpts.dir}; run it first")
        if not ckpts.is_done():
            logging.warning("stage %s did not finish (no DONE marker); using its step %d", stage, step)
        targets = param_targets(model)
        loaded = ckpts.restore_frozen_params(targets)
        loaded.update(ckpts.restore_params(step, targets))
    finally:
        ckpts.close()
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(checkpointing.assign_flat(state.to_pure_dict(), loaded))
    nnx.update(model, state)
    return set(loaded)


def load_source(model: nnx.Module, workdir: str, source: str) -> set[str]:
    """Applies one `init_from` source; returns the flat param paths it set."""
    kind, _, path = source.partition(":")
    if not path:
        return load_from_stage(model, workdir, source)
    if kind == "stage":
        parent, name = os.path.split(os.path.normpath(path))
        return load_from_stage(model, parent, name)
    if kind == "hf":
        from star_jax.convert import hf

        decoder = hf.load_hf_decoder(path, dtype=model.decoder_cfg.dtype, param_dtype=model.decoder_cfg.param_dtype)
        nnx.update(model.base, nnx.state(decoder, nnx.Param))
        return {f"base/{k}" for k in param_targets(model.base)}
    if kind == "vq":
        from star_jax.convert import vq_mapping

        vq_mapping.load_reference_vq(model.vq, path)
        return {f"vq/{k}" for k in param_targets(model.vq)}
    raise ValueError(
        f"config.train.init_from entry {source!r}: expected a stage name, 'stage:<dir>', 'hf:<dir>' or 'vq:<file>'"
    )


def initialiser(config):
    """The `Task.initialise` of `config`: apply init_from sources, then copy the stack if needed."""
    sources = list(config.train.init_from)

    def initialise(model: nnx.Module, workdir: str) -> None:
        loaded: set[str] = set()
        for source in sources:
            loaded |= load_source(model, workdir, source)
        if "stacked_ar" in model.components and not any(p.startswith("stacked_ar/") for p in loaded):
            if config.model.star.stack_init == "copy_last":
                model.copy_stack_from_base()
                logging.info("stacked AR initialised from the base's last %d layers", config.model.star.stack_layers)

    return initialise


def objective(config, vit_layout=None):
    """The loss of `config.stage`."""
    stage = config.stage
    if stage == "vision":
        if config.data.get("vision_labels", "caption_words") != "caption_words":  # scene labels
            return lambda m, b, r, s: objectives.scene_cells_loss(m, b, r, s, vit_layout=vit_layout)
        return lambda m, b, r, s: objectives.caption_words_loss(m, b, r, s, vit_layout=vit_layout)
    if stage == "understanding":
        return lambda m, b, r, s: objectives.understanding_loss(m, b, r, s, vit_layout=vit_layout)
    if stage in ("generation", "editing"):
        rate = config.model.star.caption_dropout
        return lambda m, b, r, s: objectives.image_token_loss(m, b, r, s, caption_dropout=rate, vit_layout=vit_layout)
    if stage == "vq":
        import logging

        from star_jax import objectives_vq

        vl = config.vq_loss
        perceptual = objectives_vq.make_perceptual_loss(vl.perceptual_weights or None, vl.perceptual)
        if perceptual is None:
            logging.warning("VQ perceptual loss is off (config.vq_loss.perceptual = 0): L2 + GAN only")
            print(
                "[vq] perceptual loss off: set config.vq_loss.perceptual and .perceptual_weights to enable", flush=True
            )
        return lambda m, b, r, s: objectives.vq_loss(m, b, r, s, cfg=vl, perceptual=perceptual)
    raise ValueError(f"config.stage={stage!r} has no objective")


def build_model_fn(config):
    """() -> the stage's STAR model (components of the stage only)."""
    return lambda: star.build(config, rngs=nnx.Rngs(config.seed))


def vit_layout_for(config, rows: int):
    """The static ViT layout of `rows` images of config.data.vit_image_size (one per batch row)."""
    import numpy as np

    from star_jax.models import vision

    vcfg = vision.VisionConfig.from_dict(config.model.vision)
    side = config.data.vit_image_size // vcfg.patch_size
    return vision.vision_layout(np.tile([[1, side, side]], (rows, 1)), vcfg)


def flops_per_example(config) -> float:
    """Analytic training FLOPs of one example (3x forward: frozen layers still backpropagate
    activations, which costs about as much as the weight gradients they skip)."""
    from star_jax import flops
    from star_jax.models import qwen2

    cfg = qwen2.DecoderConfig.from_dict(config.model.decoder)
    n_img = vq.grid_size(config.model.vq) ** 2
    seq = config.data.max_prompt_len + (n_img if config.stage in ("generation", "editing") else 0)
    if config.stage == "understanding":
        return flops.train_step_flops(flops.decoder_forward_flops(cfg, 1, seq))
    if config.stage in ("generation", "editing"):
        fwd = flops.decoder_forward_flops(cfg, 1, seq, head=False)
        fwd += flops.decoder_forward_flops(cfg, 1, seq, num_layers=config.model.star.stack_layers, head=False)
        fwd += 2.0 * n_img * cfg.hidden_size * config.model.vq.codebook_size
        return flops.train_step_flops(fwd)
    return 0.0


def make_task(config):
    """The `train.Task` of `config.stage`."""
    from star_jax import input_pipeline, samples, train

    rows = config.train.batch_size // config.train.grad_accum
    uses_vit = config.stage in ("vision", "understanding", "editing")
    layout = vit_layout_for(config, rows) if uses_vit else None
    n_img = vq.grid_size(config.model.vq) ** 2
    tokens = config.data.max_prompt_len + (n_img if config.stage in ("generation", "editing") else 0)
    post_update = None
    if config.stage == "vq" and config.vq_loss.reseed_every:
        import functools

        post_update = functools.partial(
            objectives.reseed_dead_codes, every=config.vq_loss.reseed_every, until=config.vq_loss.reseed_until
        )
    return train.Task(
        build_model=build_model_fn(config),
        post_update=post_update,
        objective=objective(config, layout),
        make_iterator=lambda pi, pc: input_pipeline.make_iterator(
            config, split="train", process_index=pi, process_count=pc
        ),
        initialise=initialiser(config),
        flops_per_example=flops_per_example(config),
        tokens_per_example=tokens if config.stage not in ("vq", "vision") else 1,
        sample=samples.make_sampler(config),
    )
