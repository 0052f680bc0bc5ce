r"""Memorisation: the trainer teaches a stage to map its input to its output (issue 31).

A trainer that cannot memorise is broken whatever the compute. This trains one stage on 16 fixed
shapes-world examples (distinct captions / questions / instructions) at the `shapes` size on CPU,
then decodes each of the 16 inputs greedily and counts the exact reproductions:

  generation     caption -> the VQ codes of its image (all N codes of an example must match)
  editing        (source image, instruction) -> the VQ codes of the target image
  understanding  (image, question) -> the answer string

and swaps two inputs within the decoded batch: their outputs must swap too (the output follows the
input, not the row). Everything starts from random weights: for generation and editing the VQ and
the base (decoder + ViT) are random and frozen (a code is still a deterministic function of the
image), and the stack, pixel adapter and image head must learn input -> codes; for understanding the
base trains. Run it on a checkout:

  python -m star_jax.projects.shapes.memorise --stage generation --workdir /tmp/mem   # --steps 300 etc.

It trains under `<workdir>/<stage>/` (a stage directory there is replaced), prints the numbers and
writes them to `<workdir>/memorise_<stage>.json`. The 16 examples are served by the project source
"memorise" (`config.data.memorise_indices`: the first 16 train-split indices whose text is distinct).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from star_jax import init_sources, stages, train
from star_jax.configs import star as star_config
from star_jax.decode import runner as runner_lib
from star_jax.input import examples, sources
from star_jax.shapes import splits

SOURCE = "memorise"
MODULE = "star_jax.projects.shapes.memorise"
STAGES = ("generation", "editing", "understanding")
NUM_EXAMPLES = 16
# The record field that holds each stage's input text (must be distinct over the 16 examples).
TEXT_FIELD = {"pairs": "caption", "qa": "question", "edits": "instruction"}
# Prompt lengths the 16 examples are first built at; `data.max_prompt_len` is then the longest
# example's, rounded up to PROMPT_LEN_MULTIPLE (the default budgets a 256-token reasoning rewrite or a
# 128-token instruction: up to 5x the compute for nothing here).
MAX_PROMPT_LEN = {"generation": 64, "understanding": 96, "editing": 160}
PROMPT_LEN_MULTIPLE = 8
# Defaults per stage: steps and the peak learning rate (10 warm-up steps, then cosine to 0) that
# reproduce all 16 examples from random weights. A constant 3e-3 left 2 of 16 images one code off
# after 200 generation steps (teacher-forced accuracy plateaus); the decay settles the last codes.
DEFAULT_STEPS = {"generation": 150, "editing": 150, "understanding": 100}
DEFAULT_LR = {"generation": 3e-3, "editing": 3e-3, "understanding": 3e-3}
DEFAULT_SCHEDULE = "cosine"


# ------------------------------------------------------------------------------------------------
# The 16 examples


def distinct_indices(kind: str, num: int = NUM_EXAMPLES, *, seed: int = 0, limit: int = 10_000) -> tuple[int, ...]:
    """The first `num` train-split indices of the shapes world whose `kind` record (pairs | qa |
    edits) has a text (caption / question / instruction) no earlier chosen one has."""
    field, seen, out = TEXT_FIELD[kind], set(), []
    for index in range(limit):
        ex = splits.make_example("train", index, sources.SHAPES_KIND[kind], seed=seed, resolution=8)
        if ex[field] not in seen:
            seen.add(ex[field])
            out.append(index)
            if len(out) == num:
                return tuple(out)
    raise ValueError(f"fewer than {num} distinct {field}s in the first {limit} {kind} records")


class FixedSource:
    """Records of the shapes world's train split at fixed indices: [i] -> world[indices[i]]."""

    def __init__(self, world: sources.ShapesSource, indices):
        self.world, self.indices = world, tuple(int(i) for i in indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.world[self.indices[int(i)]]


def fixed_source(config, split: str, stage, render_size: int):
    """The "memorise" source factory: every split serves the train records at
    `config.data.memorise_indices` (the examples memorised and decoded)."""
    indices = tuple(config.data.memorise_indices)
    world = sources.ShapesSource("train", stage.reads, max(indices) + 1, resolution=render_size, seed=config.seed)
    return FixedSource(world, indices), None


if SOURCE not in sources.source_names():  # once, also when this file runs as __main__ and is imported
    sources.register_source(SOURCE, fixed_source)


# ------------------------------------------------------------------------------------------------
# Config, training, decoding


def memorise_config(
    stage: str,
    *,
    steps: int,
    lr: float,
    batch_size: int = NUM_EXAMPLES,
    caption_dropout: float = 0.1,
    schedule: str = DEFAULT_SCHEDULE,
    seed: int = 0,
):
    """The `shapes`-size config of `stage` trained from random weights on the 16 examples: f32
    compute, peak rate `lr` after 10 warm-up steps then `schedule`, one checkpoint at the end.
    `caption_dropout` must be > 0 (config validation rejects 0); greedy decoding at CFG 1 reads the
    conditional logits only, so the unconditional rows cost the conditional ones a tenth of the batch."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    config = star_config.get_config(f"size=shapes,stage={stage}")
    config.imports = (MODULE,)
    config.seed = seed
    config.model.decoder.dtype = "float32"  # the results in projects/shapes/README.md were made in f32
    config.model.star.caption_dropout = caption_dropout
    reads = stages.get(stage).reads
    config.data.source = SOURCE
    config.data.num_train_examples = NUM_EXAMPLES
    config.data.num_eval_examples = NUM_EXAMPLES
    config.data.memorise_indices = distinct_indices(reads, seed=seed)
    config.data.max_prompt_len = MAX_PROMPT_LEN[stage]
    config.data.max_prompt_len = _prompt_len(config)
    config.train.init_from = ()  # random VQ and base; the stack is copied from the random base
    config.train.batch_size = batch_size
    config.train.num_steps = steps
    config.train.lr = lr
    config.train.warmup_steps = min(10, steps - 1)
    config.train.schedule = schedule
    config.train.log_every = max(1, min(25, steps))
    config.train.ckpt_every = steps
    config.train.keep_last = 1
    config.train.sample_every = 0
    return config


def _prompt_len(config) -> int:
    """The prompt length the longest of the 16 examples needs, rounded up to PROMPT_LEN_MULTIPLE."""
    _, built = _records(config, stages.for_config(config))
    bad = [b for b in built if not isinstance(b, dict)]
    if bad:
        raise ValueError(f"memorisation examples that cannot be built: {bad}")
    longest = max(int(b["prompt_mask"].sum()) for b in built)
    return -(-longest // PROMPT_LEN_MULTIPLE) * PROMPT_LEN_MULTIPLE


def _records(config, stage) -> tuple[list[dict], list]:
    """The 16 records in order and their per-example arrays (the stage's builder, as training reads them)."""
    source, parser = sources.make_source(config, "train", stage)
    prepare = examples.Prepare(source, parser, examples.ExampleSpec.from_config(config, stage), stage.example)
    records = [source[i] for i in range(len(source))]
    built = [prepare(i) for i in range(len(source))]
    return records, built


def _target_codes(runner: runner_lib.StarRunner, built: list[dict]) -> np.ndarray:
    """The VQ codes [n, N] of the target images (what the trainer's objective encodes)."""
    images = np.stack([b["images"] for b in built])
    codes = runner_lib.vq_call(runner.model.vq, "encode_to_codes", images)
    return np.asarray(codes).reshape(len(built), -1)


def _edit_codes(runner: runner_lib.StarRunner, images: np.ndarray, instructions: list[str], cfg: float) -> np.ndarray:
    """`runner.edit` greedy, returning the drawn codes [n, N] instead of their pixels."""
    drawn = []
    decode = runner.decode_codes
    runner.decode_codes = lambda codes: drawn.append(np.asarray(codes)) or decode(codes)
    try:
        runner.edit(images, instructions, cfg=cfg, temperature=0.0)
    finally:
        del runner.decode_codes
    return drawn[-1].reshape(len(instructions), -1)


def decode(runner: runner_lib.StarRunner, stage: str, records: list[dict], *, cfg: float = 1.0) -> list:
    """Greedy outputs of `records`' inputs, row by row: codes (tuples) or answer strings."""
    if stage == "generation":
        _, codes = runner.text_to_image([r["caption"] for r in records], cfg=cfg, temperature=0.0)
        return [tuple(int(c) for c in row) for row in np.asarray(codes)]
    if stage == "editing":
        images = np.stack([r["source_image"] for r in records])
        codes = _edit_codes(runner, images, [r["instruction"] for r in records], cfg)
        return [tuple(int(c) for c in row) for row in codes]
    images = np.stack([r["image"] for r in records])
    answers = runner.understand(images, [r["question"] for r in records], max_new_tokens=16, temperature=0.0)
    return [" ".join(a.split()) for a in answers]


def _swap_pair(outputs: list, targets: list) -> tuple[int, int]:
    """Two rows to swap: reproduced examples with different targets when there are two, else 0, 1."""
    good = [i for i, (o, t) in enumerate(zip(outputs, targets, strict=True)) if o == t]
    for a in good:
        for b in good:
            if targets[a] != targets[b]:
                return a, b
    return 0, 1


def memorise(
    stage: str,
    workdir: str,
    *,
    steps: int,
    lr: float | None = None,
    batch_size: int = NUM_EXAMPLES,
    caption_dropout: float = 0.1,
    schedule: str = DEFAULT_SCHEDULE,
    cfg: float = 1.0,
    seed: int = 0,
) -> dict:
    """Trains `stage` from random weights on the 16 examples under `<workdir>/<stage>` (replacing a
    stage directory there), decodes the 16 inputs greedily (CFG weight `cfg`; 1 = the conditional
    logits alone) and swaps two of them in the batch.

    Returns {"reproduced": examples whose output equals the target exactly (of 16), "swap_ok": the
    two swapped rows' outputs swapped (and differ) and no other row changed, "steps", "seconds"
    (training + decoding), "train_seconds", "loss" / "accuracy" (teacher-forced, last logged),
    "indices" (the train-split indices), "swapped" (the two rows), "failed" (rows not reproduced)}.
    """
    lr = DEFAULT_LR[stage] if lr is None else lr
    config = memorise_config(
        stage,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        caption_dropout=caption_dropout,
        schedule=schedule,
        seed=seed,
    )
    record = stages.for_config(config)
    stage_dir = os.path.join(workdir, stage)
    if os.path.isdir(stage_dir):
        print(f"[memorise] replacing {stage_dir}", flush=True)
        shutil.rmtree(stage_dir)
    t0 = time.perf_counter()
    last = train.train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - t0
    model, saved, _ = init_sources.load_workdir(workdir, (stage,))
    runner = runner_lib.StarRunner(model, saved)
    records, built = _records(config, record)
    if stage == "understanding":
        targets = [" ".join(r["answer"].split()) for r in records]
    else:
        targets = [tuple(int(c) for c in row) for row in _target_codes(runner, built)]
    outputs = decode(runner, stage, records, cfg=cfg)
    ok = [o == t for o, t in zip(outputs, targets, strict=True)]
    a, b = _swap_pair(outputs, targets)
    order = list(range(len(records)))
    order[a], order[b] = b, a
    swapped = decode(runner, stage, [records[i] for i in order], cfg=cfg)
    swap_ok = outputs[a] != outputs[b] and all(swapped[k] == outputs[order[k]] for k in range(len(records)))
    accuracy_key = "text_accuracy" if stage == "understanding" else "image_token_accuracy"
    return {
        "stage": stage,
        "reproduced": int(sum(ok)),
        "of": len(records),
        "swap_ok": bool(swap_ok),
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(train_s, 1),
        "lr": lr,
        "caption_dropout": caption_dropout,
        "schedule": schedule,
        "cfg": cfg,
        "loss": float(last.get("loss", float("nan"))),
        "accuracy": float(last.get(accuracy_key, float("nan"))),
        "records_bad": int(last.get("data/records_bad", 0)),
        "indices": list(config.data.memorise_indices),
        "swapped": [a, b],
        "failed": [i for i, good in enumerate(ok) if not good],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES, default="generation")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=None, help=f"default: {DEFAULT_STEPS}")
    parser.add_argument("--lr", type=float, default=None, help=f"peak rate; default: {DEFAULT_LR}")
    parser.add_argument("--batch_size", type=int, default=NUM_EXAMPLES)
    parser.add_argument("--caption_dropout", type=float, default=0.1, help="> 0 (validation rejects 0)")
    parser.add_argument("--schedule", choices=("constant", "cosine", "linear"), default=DEFAULT_SCHEDULE)
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance weight of the greedy decode (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = DEFAULT_STEPS[args.stage] if args.steps is None else args.steps
    result = memorise(
        args.stage,
        args.workdir,
        steps=steps,
        lr=args.lr,
        batch_size=args.batch_size,
        caption_dropout=args.caption_dropout,
        schedule=args.schedule,
        cfg=args.cfg,
        seed=args.seed,
    )
    path = os.path.join(args.workdir, f"memorise_{args.stage}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"[memorise] {args.stage}: reproduced {result['reproduced']} of {result['of']}, swap "
        f"{'ok' if result['swap_ok'] else 'FAILED'}, {steps} steps, {result['seconds']} s "
        f"(training {result['train_seconds']} s; teacher-forced loss {result['loss']:.4f}, accuracy "
        f"{result['accuracy']:.4f}); {path}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
