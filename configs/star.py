r"""STAR config: one file for every stage and size.

  star-jax train --config configs/star.py:size=tiny,stage=generation,runlocal \
      --config.train.num_steps=100 --workdir runs/tiny

Arguments: size (configs/sizes.py), stage (a name in `star_jax.stages`: vq | understanding |
generation | editing, or a project's stage with `config.imports`), runlocal (shrink batch / steps
for a CPU smoke run).
"""

import ml_collections

from star_jax import sharding, stages
from star_jax.configs import common, sizes


def get_config(arg=None):
    """Returns the ConfigDict for `arg` = "size=..,stage=..,runlocal"."""
    arg = common.parse_arg(arg, size="tiny", stage="generation", runlocal=False)
    config = ml_collections.ConfigDict()
    config.size = arg.size  # name in configs/sizes.py; the model blocks below are resolved from it
    config.stage = arg.stage  # which objective / data / trainable set this run uses (star_jax/stages.py)
    # Modules imported before the stage is looked up: a project's stages and data sources register
    # themselves there (e.g. "star_jax.projects.shapes.vision"). The core imports no project.
    config.imports = ()
    config.seed = 0  # params init, data order and sampling all derive from it

    size = sizes.get_size(arg.size)
    stage = stages.get(arg.stage) if arg.stage in stages.names() else None  # a project's stage: its config sets these
    config.model = ml_collections.ConfigDict()
    config.model.decoder = size["decoder"]  # the frozen base LLM (and the stack's layer shape)
    config.model.decoder.dtype = "bfloat16"  # compute dtype; params stay float32
    config.model.decoder.param_dtype = "float32"
    config.model.decoder.scan_layers = True  # lax.scan over the stacked layer params
    config.model.decoder.remat_policy = "none"  # none | full | dots | dots_no_batch
    config.model.vision = size["vision"]  # the ViT of the base
    config.model.vq = size["vq"]  # the image tokenizer
    config.model.star = size["star"]  # stack depth and pixel adapter depth
    config.model.star.stack_init = "copy_last"  # copy_last | random (the paper's ablation)
    config.model.star.caption_dropout = 0.1  # fraction of rows trained unconditional (CFG)

    # VQ stage losses (STAR_SPEC section 2 recipe). The perceptual loss needs user-supplied
    # LPIPS/VGG16 weights (nothing is downloaded); with weight 0 the run logs that it is off.
    config.vq_loss = ml_collections.ConfigDict()
    config.vq_loss.l2 = 1.0
    config.vq_loss.perceptual = 0.0  # the recipe uses 1.0 with LPIPS weights
    config.vq_loss.perceptual_weights = ""  # .safetensors with vgg16 features.* and LPIPS lin*.model.1.weight
    config.vq_loss.disc_weight = 0.5
    config.vq_loss.disc_start = 20_000  # PatchGAN hinge loss starts after this step
    config.vq_loss.disc_adaptive = False  # scale the GAN term by ||grad rec|| / ||grad gan|| at the last layer
    config.vq_loss.discriminator = ml_collections.ConfigDict(dict(ndf=64, n_layers=3, norm_groups=32))
    config.vq_loss.reseed_every = 0  # re-seed codes unused in the usage window from encoder outputs; 0 = off
    config.vq_loss.reseed_until = 0  # stop re-seeding after this step (0 = never stop)

    # Input (star_jax/input/). The shapes world is generated deterministically from
    # (split, index, seed); user data comes as ArrayRecord files (data/ converts folders / JSONL).
    config.data = ml_collections.ConfigDict()
    config.data.source = "shapes"  # shapes | arrayrecord | a source a project registers (config.imports)
    config.data.path = ""  # ArrayRecord directory when source = arrayrecord
    config.data.tokenizer = "builtin"  # builtin | builtin-stems (shapes world) | a Hugging Face tokenizer.json
    # ViT input. Training resizes every image to this fixed square (static batch shapes); at inference
    # (edit / understand) an image keeps its aspect ratio through the Qwen2.5-VL processor's
    # smart_resize (sides multiples of patch * merge) within these pixel bounds; 0 = vit_image_size**2.
    config.data.vit_image_size = {"tiny": 56, "shapes": 64}.get(arg.size, 448)  # pixels fed to the ViT
    official = arg.size in ("3b", "7b")  # the published models: the reference's bounds
    config.data.vit_min_pixels = 56 * 56 if official else 0  # the processor's minimum
    config.data.vit_max_pixels = 28 * 28 * 1280 if official else 0  # understanding: the processor's maximum
    config.data.vit_edit_max_pixels = 28 * 28 * 576 if official else 0  # an edit's source (<= 576 ViT tokens)
    # Prompt ids (left-padded); longer records are skipped and counted, and `generate` / `edit` refuse
    # a longer prompt. The default fits the stage's examples at this size: an edit's VQ block + ViT
    # block (of vit_edit_max_pixels) + a 128-token instruction, a 256-token reasoning rewrite + the
    # style suffix, a question + answer of 256 (configs/common.py: default_max_prompt_len). Set it
    # after changing the ViT bounds or the VQ grid; validation names the length a stage needs at least.
    config.data.max_prompt_len = common.default_max_prompt_len(config, stage)
    config.data.pretokenized = False  # records carry VQ codes (no VQ encoder in the train step)
    config.data.num_workers = 0  # Grain worker processes
    config.data.shuffle_seed = 0
    config.data.max_bad_fraction = 0.01  # stop with an error when more records than this are bad
    config.data.num_train_examples = 100_000  # size of a procedurally generated split
    config.data.num_eval_examples = 1_000  # size of a procedurally generated validation / heldout split
    config.data.bad_check_after = 1_000  # records seen before max_bad_fraction is enforced
    config.data.min_image_size = 16  # images with a smaller side are skipped (counted as bad)
    config.data.max_aspect_ratio = 4.0  # images more elongated than this are skipped (counted as bad)

    # Mesh (data, fsdp, tensor): ICI within a slice, DCN across slices; one -1 fills the rest.
    config.mesh = ml_collections.ConfigDict()
    # The published sizes shard params and optimizer state over the slice (FSDP): data parallel would
    # hold a full copy of the 3b / 7b model on every chip (`star-jax aot` shows 7b generation does not
    # fit a v5p chip that way). Smaller sizes are data parallel.
    config.mesh.ici = (1, -1, 1) if arg.size in ("3b", "7b") else (-1, 1, 1)
    config.mesh.dcn = (1, 1, 1)
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = common.to_list_of_pairs(sharding.DEFAULT_RULES)  # logical -> mesh axes

    # Multi-process start (star_jax/distributed.py), before anything touches a device.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.mode = "off"  # off | auto (TPU metadata, Slurm, Open MPI) | explicit (JAX_* env vars)
    config.distributed.coordinator_port = 8476  # used when the coordinator address names no port
    config.distributed.timeout_s = 300  # how long a process waits for the coordinator
    config.distributed.compilation_cache_dir = ""  # shared persistent XLA cache (a bucket on a pod); "" = off

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 256  # global batch, split over (data, fsdp)
    config.train.grad_accum = 1  # microbatches per step (lax.scan)
    config.train.num_steps = 10_000
    config.train.lr = 1e-4
    config.train.warmup_steps = 500
    config.train.schedule = "cosine"  # cosine | linear | constant (after warm-up)
    config.train.weight_decay = 0.0
    config.train.b1 = 0.9
    config.train.b2 = 0.95
    config.train.clip_norm = 1.0
    config.train.trainable = stage.trainable if stage else ()  # tuples: overridable from the command line
    # ((regex, factor), ...): the update of a trainable param whose path matches is scaled by factor.
    config.train.lr_mults = ()
    config.train.init_from = stage.init_from if stage else ()
    config.train.nonfinite = "stop"  # stop | skip (skip up to max_skipped_steps, then stop)
    config.train.max_skipped_steps = 10
    config.train.log_every = 50
    config.train.ckpt_every = 1000
    # Also save at the first log step after this many seconds (process 0 decides); 0 = off.
    config.train.ckpt_every_s = 0.0
    config.train.keep_last = 3
    config.train.keep_every = 0  # also keep every m-th step forever; 0 = off
    # Generation / editing: a grid of samples (PNG + TensorBoard) every k steps and at the last
    # step (star_jax/samples.py); 0 = off. sample_num validation captions or edits, at sample_cfg.
    config.train.sample_every = 0
    config.train.sample_num = 8
    config.train.sample_cfg = 3.0

    if arg.runlocal:
        config.train.batch_size = 8
        config.train.num_steps = 20
        config.train.warmup_steps = 2
        config.train.log_every = 5
        config.train.ckpt_every = 10
        config.model.decoder.dtype = "float32"
    return config
