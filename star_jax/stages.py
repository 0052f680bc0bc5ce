"""The stage registry: one record per training stage of STAR, and nothing else names stages.

A stage is config, not code (DESIGN principle 2): one trainer serves all, and a `Stage` says what
differs between them: what its input pipeline reads and assembles, which model parts it builds,
which params it trains (everything else frozen), where it initialises from, whether it runs the
ViT, its objective, its FLOPs and tokens per example, and its sampler. Adding a stage means one
`register(Stage(...))` (here for STAR's own stages, in a project module for a project's, named in
`config.imports`) and its objective.

  vq             the image tokenizer (VQ autoencoder + PatchGAN) on images
  understanding  the base (decoder + ViT) on question -> answer turns
  generation     the stack, pixel adapter and image head on caption -> image tokens; base frozen
  editing        the same parts on (source image, instruction) -> target image tokens
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import re
from collections.abc import Callable

from flax import nnx

from star_jax import flops, objectives, objectives_vq, samples
from star_jax.input import examples
from star_jax.models import qwen2, star, vision, vq

# (config, vit_layout) -> (model, batch, rng, step) -> (loss f32 scalar, metrics dict)
ObjectiveFactory = Callable[[object, object], Callable]


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything stage-specific that is not plain config.

    name: the value of `config.stage`.
    reads: the kind of record its source yields: "pairs" (image + caption), "qa" (image + question
      + answer) or "edits" (source image + instruction + target image).
    example: (input.examples.Prepare, record) -> the per-example arrays of the stage's batch.
    components: the `models.star.Star` parts it builds (a VQ run never holds an LLM).
    trainable: regexes over '/'-joined param paths; every other param is frozen (no gradient, no
      optimizer state, bit-identical after training). The default of `config.train.trainable`.
    init_from: the default of `config.train.init_from` (earlier stages, `hf:`, `vq:` sources).
    uses_vit: its prompts hold ViT tokens (the batch carries pixels and a static ViT layout).
    vq_images: it reads images at the VQ's resolution (or their pre-tokenised codes).
    image_tokens: its sequences end in the image's VQ codes (tokens per example include them).
    objective: (config, vit_layout) -> the loss (see `ObjectiveFactory`).
    flops_per_example: config -> analytic training FLOPs of one example (MFU).
    sampler: (config, stage) -> `samples.Sampler` or None (sample grids every `train.sample_every` steps).
    post_update: config -> a function run in the step after the optimizer update, or None.
    augment: (example, np.random.Generator) -> example, a seeded random op of the input pipeline.
    extra_parts: (config, model, rngs) -> {name: nnx.Module}: parts a project's stage adds to the
      model (e.g. a classifier head on the ViT), built after the components.
    """

    name: str
    reads: str
    example: Callable
    components: tuple[str, ...]
    trainable: tuple[str, ...]
    objective: ObjectiveFactory
    init_from: tuple[str, ...] = ()
    uses_vit: bool = False
    vq_images: bool = False
    image_tokens: bool = False
    flops_per_example: Callable = lambda config: 0.0
    sampler: Callable | None = None
    post_update: Callable | None = None
    augment: Callable | None = None
    extra_parts: Callable | None = None

    def tokens_per_example(self, config) -> int:
        """Tokens one example trains on: prompt (+ image tokens), or 1 for image-only stages."""
        if self.reads == "qa" or self.image_tokens:
            return config.data.max_prompt_len + (num_image_tokens(config) if self.image_tokens else 0)
        return 1


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Adds `stage` to the registry (a project module calls this at import). Returns it."""
    if stage.name in _REGISTRY and _REGISTRY[stage.name] != stage:
        raise ValueError(f"stage {stage.name!r} is already registered")
    _REGISTRY[stage.name] = stage
    return stage


def names() -> tuple[str, ...]:
    """The registered stage names, in registration order."""
    return tuple(_REGISTRY)


def import_projects(config) -> None:
    """Imports the modules of `config.imports` (projects register their stages and sources there)."""
    for name in config.get("imports", ()) or ():
        importlib.import_module(name)


def get(name: str) -> Stage:
    """The registered stage `name`; a ValueError naming the known stages otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"config.stage={name!r} is not a stage; known: {', '.join(names())}")
    return _REGISTRY[name]


def for_config(config) -> Stage:
    """The stage of `config.stage`, after importing `config.imports`."""
    import_projects(config)
    return get(config.stage)


def build_model(config, stage: str | None = None, *, rngs: nnx.Rngs) -> star.Star:
    """The STAR model of `config` with the parts `stage` (default `config.stage`) builds."""
    record = get(stage) if stage else for_config(config)
    return star.build(config, record.components, rngs=rngs, extra_parts=_bind_extra(record, config))


def _bind_extra(record: Stage, config):
    if record.extra_parts is None:
        return None
    return functools.partial(record.extra_parts, config)


def num_image_tokens(config) -> int:
    """N: VQ codes per image."""
    return vq.grid_size(config.model.vq) ** 2


def vit_layout(config, rows: int):
    """The static ViT layout of `rows` images of `config.data.vit_image_size` (one per batch row)."""
    vcfg = vision.VisionConfig.from_dict(config.model.vision)
    return vision.vit_layout(vcfg, config.data.vit_image_size, rows)


# ------------------------------------------------------------------------------------------------
# Objectives and FLOPs of STAR's stages


def _understanding_objective(config, vit_layout):
    return functools.partial(objectives.understanding_loss, vit_layout=vit_layout)


def _image_token_objective(config, vit_layout):
    rate = config.model.star.caption_dropout
    return functools.partial(objectives.image_token_loss, caption_dropout=rate, vit_layout=vit_layout)


def _vq_objective(config, vit_layout):
    vl = config.vq_loss
    perceptual = objectives_vq.make_perceptual_loss(vl.perceptual_weights or None, vl.perceptual)
    if perceptual is None:
        logging.warning("VQ perceptual loss is off (config.vq_loss.perceptual = 0): L2 + GAN only")
        print("[vq] perceptual loss off: set config.vq_loss.perceptual and .perceptual_weights to enable", flush=True)
    return functools.partial(objectives_vq.vq_loss, cfg=vl, perceptual=perceptual)


def _vq_post_update(config):
    if not config.vq_loss.reseed_every:
        return None
    return functools.partial(
        objectives_vq.reseed_dead_codes, every=config.vq_loss.reseed_every, until=config.vq_loss.reseed_until
    )


def _part_mode(config, part: str, *, upstream_trains: bool = False) -> str:
    """The FLOP mode (`flops.MODES`) of model part `part`: train when a `config.train.trainable`
    regex matches its params, backprop when frozen but a trainable part feeds it, else forward."""
    if any(re.search(p, f"{part}/") for p in config.train.trainable):
        return "train"
    return "backprop" if upstream_trains else "forward"


def _vit_flops(config) -> float:
    """The ViT on one image of `data.vit_image_size` (3x when the ViT trains)."""
    fwd = flops.vision_forward_flops(config.model.vision, config.data.vit_image_size)
    return fwd * (3.0 if _part_mode(config, "vision") == "train" else 1.0)


def _understanding_flops(config) -> float:
    """The base over the prompt (ViT tokens included) and its LM head, plus the ViT: 3x forward
    for what trains, the forward alone for what is frozen (nothing trainable feeds the base here)."""
    cfg = qwen2.DecoderConfig.from_dict(config.model.decoder)
    seq = config.data.max_prompt_len
    vit_trains = _part_mode(config, "vision") == "train"
    mode = _part_mode(config, "base", upstream_trains=vit_trains)
    total = flops.decoder_pass_flops(cfg, seq, cfg.num_layers, mode)
    total += flops.dense_flops(seq, cfg.hidden_size, cfg.vocab_size, mode)
    return total + _vit_flops(config)


def _image_token_flops(config) -> float:
    """What a generation / editing step computes per example (`flops` module docstring): the VQ
    encoder forward on each image unless pre-tokenised, the ViT forward (editing), the base over
    the prompt and the first N - 1 image tokens with gradients w.r.t. activations only (the frozen
    base carries the adapter's gradient), the stack trained over the same tokens, the pixel
    adapter on the image tokens and the image head on the N predicted positions."""
    cfg = qwen2.DecoderConfig.from_dict(config.model.decoder)
    record = for_config(config)
    n_img = num_image_tokens(config)
    seq = config.data.max_prompt_len + n_img - 1
    adapter_mode = _part_mode(config, "pixel_adapter")
    total = 0.0
    if not config.data.get("pretokenized", False):
        images = 2 if record.reads == "edits" else 1
        total += images * flops.vq_encoder_flops(config.model.vq)
    if record.uses_vit:
        total += _vit_flops(config)
    total += flops.decoder_pass_flops(
        cfg, seq, cfg.num_layers, _part_mode(config, "base", upstream_trains=adapter_mode == "train")
    )
    total += flops.decoder_pass_flops(cfg, seq, config.model.star.stack_layers, _part_mode(config, "stacked_ar"))
    adapted = n_img - 1 + (n_img if record.reads == "edits" else 0)  # the source image's codes too
    d, depth = cfg.hidden_size, config.model.star.adapter_depth
    total += flops.dense_flops(adapted, config.model.vq.codebook_dim, d, adapter_mode)
    total += (depth - 1) * flops.dense_flops(adapted, d, d, adapter_mode)
    total += flops.dense_flops(n_img, d, config.model.vq.codebook_size, _part_mode(config, "image_head"))
    return total


STACK_PARTS = (r"^stacked_ar/", r"^pixel_adapter/", r"^image_head/")

VQ = register(
    Stage(
        name="vq",
        reads="pairs",
        example=examples.vq_images,
        components=("vq", "discriminator"),
        trainable=(r"^vq/", r"^discriminator/"),
        objective=_vq_objective,
        vq_images=True,
        post_update=_vq_post_update,
        augment=examples.random_flip,
    )
)
UNDERSTANDING = register(
    Stage(
        name="understanding",
        reads="qa",
        example=examples.understanding,
        components=("base", "vision"),
        trainable=(r"^base/", r"^vision/"),
        objective=_understanding_objective,
        uses_vit=True,
        flops_per_example=_understanding_flops,
    )
)
GENERATION = register(
    Stage(
        name="generation",
        reads="pairs",
        example=examples.generation,
        components=star.ALL_COMPONENTS,
        trainable=STACK_PARTS,
        init_from=("vq", "understanding"),
        objective=_image_token_objective,
        vq_images=True,
        image_tokens=True,
        flops_per_example=_image_token_flops,
        sampler=samples.generation_sampler,
    )
)
EDITING = register(
    Stage(
        name="editing",
        reads="edits",
        example=examples.editing,
        components=star.ALL_COMPONENTS,
        trainable=STACK_PARTS,
        init_from=("generation",),
        objective=_image_token_objective,
        uses_vit=True,
        vq_images=True,
        image_tokens=True,
        flops_per_example=_image_token_flops,
        sampler=samples.editing_sampler,
    )
)
