r"""The shapes-world demo: every STAR stage on this CPU, then exact evaluation.

  star-jax pipeline --config projects/shapes/config.py --workdir runs/demo
  star-jax pipeline --config projects/shapes/config.py:quality --workdir runs/quality   # every stage 4x
  star-jax pipeline --config projects/shapes/config.py:joint --workdir runs/joint       # ablation
  star-jax pipeline --config projects/shapes/config.py:vision --workdir runs/vision     # + vision stage
  star-jax pipeline --config projects/shapes/config.py:base --workdir runs/base         # the base, longer

Evaluation samples at temperature 1 with classifier-free guidance 20 and no top-k / top-p, the
reference's command-line setting (STAR_SPEC section 4: cfg 20, top-k 2000 of 65,536 codes, top-p 1;
temperature always 1). On three generation checkpoints (32-48 prompts per task) CFG 20 scored
0.20 / 0.17 / 0.15 where CFG 3 scored 0.135 / 0.083 / 0.094: the stack barely uses the caption
(log.md, the experiment log), and strong guidance amplifies what it does use.
Greedy decoding draws the background everywhere: the quality run's ShapeEval was 0.016 greedy
and 0.23 sampled (same weights, 16 prompts per task).
Edits keep CFG 3 (`edit_cfg`): on the quality run's weights, 3 of 96 edits succeeded at CFG 3 and
none at CFG 20.

`vision` adds the vision stage before understanding: the ViT alone learns which words an image's
caption holds (bag of words), and the understanding stage starts from it. It is off by default: in
a fresh clone (3f5cff4, 14 min 22 s, 66 s in the vision stage) the demo's QA rose from 0.385 to
0.448 overall but so did its control (0.396 to 0.438), and ShapeEval read 0.042 (0.083 before
editing) against 0.167 (0.250).

`base` trains only the base, longer (issue 5's understanding target): the vision stage for 3,000
steps at a constant 3e-3, then understanding from its tower for `und_steps` (default 1,200) cosine
steps, and reports QA on 192 validation questions against the control. Its vision stage trains on
scene cells (`data.vision_labels`): each merged ViT token names the shape and colour of the object
centred in its cell. The bag of caption words taught the tower colour but hardly shape
(log.md), and every question names its objects by shape.

`joint` is the ablation of STAR's central claim: the generation and editing stages also train the
base (decoder + ViT) instead of freezing it; its report shows what that does to understanding.

Step counts are sized from step times measured on the 2-core CPU on 2026-11-29 (f32; batch 32,
vq and editing 16): vq 0.17 s, understanding 2.0 s, generation 1.9 s, editing 2.0 s, so that the
demo (plus about 20 s of compilation per stage and the evaluation) fits in 15 minutes. Since the
vision tower attends per image, understanding takes 1.0 s and editing 1.6 s a step (demo 12 min 40 s).

Stage-specific settings live in `config.stage_overrides.<stage>` (merged onto the shared config
when that stage runs); each can be overridden from the command line, e.g.
`--config.stage_overrides.generation.train.num_steps=500`.
"""

import ml_collections

from star_jax import stages
from star_jax.configs import common, star

# The project's modules: `vision` registers the vision stage, `data` the understanding mixture source.
IMPORTS = ("star_jax.projects.shapes.data", "star_jax.projects.shapes.vision")


def get_config(arg=None):
    arg = common.parse_arg(arg, quality=False, joint=False, vision=False, base=False, und_steps=1200)
    # The quality config trains every stage 4x longer. Generation 8x scored no better: ShapeEval
    # 0.10 at 880 steps against 0.18 at 440 (32 prompts per task, same VQ and base; log.md).
    scale = 4 if arg.quality else 1
    config = star.get_config("size=shapes,stage=vq")
    config.imports = IMPORTS
    stages.import_projects(config)
    # The shapes world with the understanding stream's mixture (projects/shapes/data.py): a fraction
    # of examples ask for the caption, several questions per image, grounding questions. Its pairs
    # and edits are the core source's.
    config.data.source = "shapes_mix"
    config.data.caption_fraction = 0.0
    config.data.qa_per_image = 1
    config.data.grounding_fraction = 0.0
    # The vision stage's labels (projects/shapes/vision.py): caption_words | scene_cells | scene_cover,
    # and with scene labels each object's centre regressed.
    config.data.vision_labels = "caption_words"
    config.data.scene_centres = False
    config.model.decoder.dtype = "float32"  # the results in projects/shapes/README.md were made in f32
    config.vq_loss.disc_weight = 0.0  # L2 only: the GAN term costs 3 discriminator passes a step
    config.vq_loss.reseed_every = 10  # keeps codebook usage high on a short run
    config.data.vit_image_size = 64
    config.data.max_prompt_len = 48
    config.train.log_every = 10
    config.train.ckpt_every = 200
    config.train.keep_last = 1

    config.pipeline = ml_collections.ConfigDict()
    config.pipeline.stages = ("vq", "vision", "understanding", "generation", "editing")
    if not arg.vision:
        config.pipeline.stages = tuple(s for s in config.pipeline.stages if s != "vision")
    config.pipeline.eval = ml_collections.ConfigDict(
        dict(
            per_task=8 * scale,
            qa=96,
            edits=24 * scale,
            cfg=20.0,
            edit_cfg=3.0,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            seed=0,
            caption_pairs=64,  # teacher-forced pairs of the caption-information measurement
            usage_images=1024,  # renders of the codebook usage / entropy measurement
            locality_edits=128,  # edit pairs of the code-locality measurement
        )
    )

    def stage(steps, batch, lr, **extra):
        d = {
            "train": {
                "num_steps": steps * scale,
                "batch_size": batch,
                "lr": lr,
                "warmup_steps": 10,
                "schedule": "cosine",
            }
        }
        for key, value in extra.items():
            d.setdefault(key, {}).update(value)
        return d

    config.stage_overrides = ml_collections.ConfigDict(
        {
            "vq": stage(1200, 16, 2e-3, vq_loss={"reseed_until": 800 * scale}),
            # Half the examples caption the whole image: on QA alone the base answered from priors
            # (shuffled images changed 6 % of answers after 480 steps); with captions it reads them.
            "vision": stage(300, 32, 3e-3),
            "understanding": stage(120, 32, 1e-3, data={"max_prompt_len": 64, "caption_fraction": 0.5}),
            # Sample grids (<stage>/samples_<step>.png) at the evaluation's guidance.
            "generation": stage(110, 32, 1e-3, train={"sample_every": 55 * scale, "sample_cfg": 20.0}),
            "editing": stage(40, 16, 5e-4, data={"max_prompt_len": 128}, train={"sample_every": 20 * scale}),
        }
    )
    for name in config.stage_overrides:  # settable per stage, e.g. 'stage:<other run>/vision'
        config.stage_overrides[name].train.init_from = stages.get(name).init_from
        config.stage_overrides[name].train.trainable = stages.get(name).trainable
    if arg.vision or arg.base:
        config.stage_overrides.understanding.train.init_from = ("vision",)
    if arg.base:
        config.pipeline.stages = ("vision", "understanding")
        config.data.vision_labels = "scene_cells"
        config.pipeline.eval.qa = 192
        config.stage_overrides.vision.train.update(num_steps=3000, schedule="constant")
        config.stage_overrides.understanding.train.num_steps = arg.und_steps
    if arg.joint:
        everything = list(stages.get("generation").trainable) + [r"^base/", r"^vision/"]
        for name in ("generation", "editing"):
            config.stage_overrides[name].train.trainable = tuple(everything)
    return config
