"""Exact evaluation of every STAR capability in the shapes world (no neural judge):

generation     ShapeEval (GenEval's six tasks) on images drawn from held-out-free validation prompts
understanding  exact-match QA accuracy per question type
editing        success = the edited image satisfies the target scene's metadata (ShapeEval logic)
vq ceiling     ShapeEval on VQ round-trip reconstructions of ground-truth renders, and their PSNR
controls       ShapeEval of what must score (near) 0: an untrained stack's samples, VQ decodes of
               uniformly random codes, scattered palette-coloured fragments; CONTROL_LIMIT bounds them
caption information  what the caption is worth to the stack: teacher-forced image-token
               cross-entropy with and without it, by kind of grid cell
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

from star_jax import sequences, shapes, sharding
from star_jax.decode import runner as runner_lib
from star_jax.decode.runner import to_float, to_uint8, vq_call
from star_jax.models import star

CONTROL_LIMIT = 0.05  # ShapeEval overall a control may reach: above it the scorer passes noise
TRAINED_PARTS = ("stacked_ar", "pixel_adapter", "image_head")  # what an untrained stack starts fresh


def generation_prompts(per_task: int, split: str = "validation", seed: int = 0) -> tuple[list[str], list[dict]]:
    """The prompts and GenEval metadata of `generation`: `per_task` per GenEval tag, tag-major."""
    prompts, metas = [], []
    for tag in shapes.GENEVAL_TAGS:
        for i in range(per_task):
            ex = shapes.make_example(split, i, "pair", seed=seed, tag=tag)
            prompts.append(ex["caption"])
            metas.append(ex["metadata"])
    return prompts, metas


def score(images: np.ndarray, metas: list[dict]) -> dict:
    """ShapeEval of uint8 images [n, H, W, 3] against `metas` (one each):
    {"results": [{"tag", "prompt", "correct", "reason"}], "summary", "table"}."""
    results = []
    for img, meta in zip(images, metas, strict=True):
        correct, reason = shapes.evaluate_image(img, meta)
        results.append({"tag": meta["tag"], "prompt": meta["prompt"], "correct": correct, "reason": reason})
    return {"results": results, "summary": shapes.summarize(results), "table": shapes.format_table(results)}


def generation(runner, *, per_task: int, split: str = "validation", seed: int = 0, batch: int = 16, **sampling) -> dict:
    """ShapeEval of text-to-image samples: `per_task` prompts for each GenEval tag.

    Returns {"results": [...], "summary": shapes.summarize(...), "table": str, "samples": uint8 [k, H, W, 3]}.
    """
    prompts, metas = generation_prompts(per_task, split, seed)
    images = []
    for start in range(0, len(prompts), batch):
        out, _ = runner.text_to_image(prompts[start : start + batch], seed=seed + start, **sampling)
        images.append(out)
    images = np.concatenate(images)
    # Samples for the report: the first image of each task.
    samples = images[:: max(per_task, 1)][: len(shapes.GENEVAL_TAGS)]
    return score(images, metas) | {"samples": samples}


def untrained_stack(runner, seed: int = 0) -> runner_lib.StarRunner:
    """A runner whose model is `runner`'s as its generation stage starts: the frozen parts (base,
    ViT, VQ) of `runner.model`, the stack copied from the base's last layers (or fresh, per
    `config.model.star.stack_init`), the pixel adapter and the image head freshly initialised."""
    config, trained = runner.config, runner.model
    parts = tuple(p for p in TRAINED_PARTS if p in trained.components)
    mesh, rules = sharding.single_device_mesh(), sharding.DEFAULT_RULES
    # Only the trained parts are built (initialising a base and a ViT again would be wasted).
    fresh = sharding.create_sharded(lambda: star.build(config, parts, rngs=nnx.Rngs(seed)), mesh, rules)
    model = nnx.clone(trained)
    for part in parts:
        nnx.update(getattr(model, part), nnx.state(getattr(fresh, part)))
    if "stacked_ar" in parts and config.model.star.stack_init == "copy_last":
        with sharding.use_mesh(mesh, rules):
            model.copy_stack_from_base()
    return runner_lib.StarRunner(model, config, tok=runner.tok)


def random_code_images(decode, codebook_size: int, num_tokens: int, num: int, seed: int = 0) -> np.ndarray:
    """VQ decodes of uniformly random codes: decode(int codes [num, num_tokens]) -> uint8 images."""
    codes = np.random.default_rng(seed).integers(0, codebook_size, (num, num_tokens))
    return np.asarray(decode(codes))


def fragment_images(num: int, resolution: int = 64, seed: int = 0) -> np.ndarray:
    """Scattered palette-coloured fragments on the background: uint8 [num, R, R, 3].

    Each image holds 6 to 24 blobs (random palette colour, random blob of 1 to 12 % of the side,
    smoothed like a decoder's output): what a generator that learned colours but not objects draws.
    """
    rng = np.random.default_rng(seed)
    palette = np.array(list(shapes.COLORS.values()), np.float32)
    out = np.empty((num, resolution, resolution, 3), np.uint8)
    for i in range(num):
        image = np.empty((resolution, resolution, 3), np.float32)
        image[:] = shapes.BACKGROUND
        for _ in range(rng.integers(6, 25)):
            side = max(2, int(resolution * rng.uniform(0.01, 0.12)))
            y, x = rng.integers(0, resolution - side, 2)
            blob = ndimage.gaussian_filter(rng.random((side, side)), side / 4) > 0.5
            image[y : y + side, x : x + side][blob] = palette[rng.integers(len(palette))]
        out[i] = np.clip(ndimage.gaussian_filter(image, (0.8, 0.8, 0)), 0, 255).round().astype(np.uint8)
    return out


def controls(runner, *, per_task: int, split: str = "validation", seed: int = 0, batch: int = 16, **sampling) -> dict:
    """ShapeEval of the controls of a generation evaluation, on its prompts' metadata:
    {"untrained_stack", "random_codes", "fragments"}, each {"summary", "table", "results"}.

    untrained_stack: `generation` of `untrained_stack(runner)` with the same sampling;
    random_codes: `runner`'s VQ decoder on uniformly random codes;
    fragments: `fragment_images` at the VQ's resolution. Each should score <= CONTROL_LIMIT.
    """
    prompts, metas = generation_prompts(per_task, split, seed)
    fresh = untrained_stack(runner, seed)
    out = {"untrained_stack": generation(fresh, per_task=per_task, split=split, seed=seed, batch=batch, **sampling)}
    del out["untrained_stack"]["samples"]
    codebook = runner.model.vq_cfg.codebook_size
    codes = random_code_images(runner.decode_codes, codebook, runner.num_tokens, len(metas), seed)
    out["random_codes"] = score(codes, metas)
    out["fragments"] = score(fragment_images(len(metas), runner.model.vq_cfg.image_size, seed), metas)
    return out


def vq_controls(vq_model, *, per_task: int, split: str = "validation", seed: int = 0) -> dict:
    """The controls a tokenizer alone gives (`controls` without the stack): {"random_codes",
    "fragments"}, each {"summary", "table", "results"}, on the generation prompts' metadata."""
    _, metas = generation_prompts(per_task, split, seed)
    grid = vq_model.cfg.grid_size
    decode = lambda codes: to_uint8(vq_call(vq_model, "decode_codes", jnp.asarray(codes).reshape(-1, grid, grid)))
    codes = random_code_images(decode, vq_model.cfg.codebook_size, grid * grid, len(metas), seed)
    fragments = fragment_images(len(metas), vq_model.cfg.image_size, seed)
    return {"random_codes": score(codes, metas), "fragments": score(fragments, metas)}


def understanding(
    runner,
    *,
    num: int,
    split: str = "validation",
    seed: int = 0,
    batch: int = 32,
    shuffle_images: bool = False,
    max_new_tokens: int = 16,
) -> dict:
    """Exact-match QA accuracy: {"per_kind": {kind: accuracy}, "overall", "answers": [(q, a, pred)], "kinds"}.

    A prediction is scored by its final answer (`captions.final_answer`: after any reasoning such as
    "(3, 7) (6, 2): no"); "answers" keeps the whole replies. `max_new_tokens` bounds a reply (a
    reasoned position answer takes 12 tokens, a plain answer 1-2). "reasoning" (None when no reply
    reasons) checks the points of reasoned position replies against the named objects' own:
    {"replies", "points_exact", "points_within_one" (every coordinate off by at most one tenth)}.

    shuffle_images: the control that measures what the base answers from priors alone: question i
    is asked about image i + 1 (of another scene), scored against image i's answer.
    """
    exs = [shapes.make_example(split, i, "qa", seed=seed) for i in range(num)]
    images = np.stack([e["image"] for e in exs])
    if shuffle_images:
        images = np.roll(images, -1, axis=0)
    preds = []
    for start in range(0, num, batch):
        chunk = exs[start : start + batch]
        preds += runner.understand(
            images[start : start + batch], [e["question"] for e in chunk], max_new_tokens=max_new_tokens
        )
    by_kind: dict[str, list[bool]] = {}
    for e, p in zip(exs, preds):
        by_kind.setdefault(e["qa_kind"], []).append(shapes.captions.final_answer(p) == e["answer"].strip())
    per_kind = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
    return {
        "per_kind": per_kind,
        "overall": float(np.mean([x for v in by_kind.values() for x in v])),
        "answers": [(e["question"], e["answer"], p) for e, p in zip(exs, preds)],
        "kinds": [e["qa_kind"] for e in exs],
        "reasoning": _reasoned_points(exs, preds),
    }


def _reasoned_points(exs: list[dict], preds: list[str]) -> dict | None:
    """How well reasoned position replies ground their two objects (see `understanding`)."""
    errors = []
    for e, p in zip(exs, preds):
        truth = shapes.captions.reason_about_position(e["scene"], e["question"], e["answer"])
        said, true = shapes.captions.reasoned_points(p), shapes.captions.reasoned_points(truth or "")
        if said and true:
            errors.append(np.abs(np.subtract(said, true)).max())
    if not errors:
        return None
    errors = np.asarray(errors)
    return {
        "replies": len(errors),
        "points_exact": float(np.mean(errors == 0)),
        "points_within_one": float(np.mean(errors <= 1)),
    }


def editing(runner, *, num: int, split: str = "validation", seed: int = 0, batch: int = 16, **sampling) -> dict:
    """Editing success per edit kind: the edited image satisfies the target scene's metadata."""
    exs = [shapes.make_example(split, i, "edit", seed=seed) for i in range(num)]
    outs = []
    for start in range(0, num, batch):
        chunk = exs[start : start + batch]
        outs.append(
            runner.edit(
                np.stack([e["source_image"] for e in chunk]),
                [e["instruction"] for e in chunk],
                seed=seed + start,
                **sampling,
            )
        )
    outs = np.concatenate(outs)
    by_kind: dict[str, list[bool]] = {}
    for e, img in zip(exs, outs):
        ok, _ = shapes.evaluate_image(img, shapes.scene_metadata(e["target"]))
        by_kind.setdefault(e["edit_kind"], []).append(ok)
    return {
        "per_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "overall": float(np.mean([x for v in by_kind.values() for x in v])),
        "samples": np.concatenate([np.stack([e["source_image"] for e in exs[:4]]), outs[:4]]),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def vq_ceiling(reconstruct, *, per_task: int, split: str = "validation", seed: int = 0, resolution: int = 64) -> dict:
    """ShapeEval and PSNR of VQ round trips of ground-truth renders: the tokenizer's ceiling.

    reconstruct: uint8 [n, R, R, 3] -> uint8 [n, R, R, 3].
    """
    exs = [
        shapes.make_example(split, i, "pair", seed=seed, tag=tag, resolution=resolution)
        for tag in shapes.GENEVAL_TAGS
        for i in range(per_task)
    ]
    originals = np.stack([e["image"] for e in exs])
    recon = reconstruct(originals)
    scored = score(recon, [e["metadata"] for e in exs])
    return {
        "psnr": float(np.mean([psnr(a, b) for a, b in zip(originals, recon)])),
        "summary": scored["summary"],
        "table": scored["table"],
    }


def _encode_cells(encode, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes [n, h, w] of uint8 images [n, R, R, 3] (encoded 64 at a time) and the images as
    grid cells [n, h, R / h, w, R / w, 3], cell (i, j) being the pixels code (i, j) stands for."""
    codes = np.concatenate([np.asarray(encode(images[i : i + 64])) for i in range(0, len(images), 64)])
    n, h, w = codes.shape
    return codes, images.reshape(n, h, images.shape[1] // h, w, images.shape[2] // w, 3)


def code_statistics(
    encode, codebook_size: int, *, num: int = 1024, split: str = "validation", seed: int = 0
) -> dict[str, float]:
    """How `num` renders of `split` use the codebook.

    encode: uint8 [n, R, R, 3] -> int codes [n, h, w]. Returns
      codebook_usage      distinct codes / codebook_size (1,024 renders of the shapes demo cover
                          each of 1,024 codes with probability 1 - e^-64 when usage is uniform);
      token_entropy_bits  entropy of the codes' empirical distribution, bits per token;
      background_codes    distinct codes of grid cells whose pixels are all background: 1 for a
                          tokenizer that gives equal content equal codes, hundreds when context
                          spreads the background over interchangeable codes (what the stack must
                          then guess between).
    """
    images = np.stack([shapes.make_example(split, i, "pair", seed=seed)["image"] for i in range(num)])
    codes, cells = _encode_cells(encode, images)
    background = (cells == np.array(shapes.BACKGROUND, np.uint8)).all(axis=(2, 4, 5))
    freq = np.bincount(codes.ravel(), minlength=codebook_size) / codes.size
    freq = freq[freq > 0]
    return {
        "codebook_usage": float(len(freq) / codebook_size),
        "token_entropy_bits": float(-(freq * np.log2(freq)).sum()),
        "background_codes": int(len(np.unique(codes[background]))),
    }


def edit_code_locality(encode, *, num: int = 128, split: str = "validation", seed: int = 0) -> dict[str, float]:
    """How much of an edit's token sequence a tokenizer lets the stack copy, over `num` edit pairs.

    encode: uint8 [n, R, R, 3] -> int codes [n, h, w]. Returns
      edit_unchanged_cells  fraction of grid cells whose pixels are equal in source and target;
      edit_codes_kept       fraction of those cells whose code is equal too: 1 for a tokenizer whose
                            codes see only their own cell; low when context makes every code
                            depend on the whole image, so an edit rewrites most of the sequence.
    """
    exs = [shapes.make_example(split, i, "edit", seed=seed) for i in range(num)]
    source = np.stack([e["source_image"] for e in exs])
    target = np.stack([e["target_image"] for e in exs])
    (source_codes, source_cells), (target_codes, target_cells) = (_encode_cells(encode, x) for x in (source, target))
    unchanged = (source_cells == target_cells).all(axis=(2, 4, 5))
    return {
        "edit_unchanged_cells": float(unchanged.mean()),
        "edit_codes_kept": float((source_codes == target_codes)[unchanged].mean()),
    }


def caption_information(runner, *, num: int = 64, split: str = "validation", seed: int = 0, batch: int = 16) -> dict:
    """Teacher-forced image-token cross-entropy (nats per token) of `num` caption-image pairs, with
    the caption (`cond`) and with it replaced by <|fim_pad|> (`uncond`, the CFG row), by grid cell:

      background    cells whose pixels are all background;
      object        the other cells;
      first_object  each image's first object cell in raster order, where the stack must choose
                    what to draw (colour and shape are worth log(10 * 5) = 3.9 nats there).

    `gain` = uncond - cond: how much the caption lowers the loss. Returns
    {kind: {"cond", "uncond", "gain"}} (floats).
    """
    model, tok, size = runner.model, runner.tok, runner.model.vq_cfg.image_size
    exs = [shapes.make_example(split, i, "pair", seed=seed, resolution=size) for i in range(num)]
    rows = [
        sequences.generation_example(
            tok, e["caption"], max_prompt_len=runner.config.data.max_prompt_len, num_image_tokens=runner.num_tokens
        )
        for e in exs
    ]
    encode = jax.jit(model.vq.encode_to_codes)
    codes, cells = _encode_cells(lambda x: encode(jnp.asarray(to_float(x, size))), np.stack([e["image"] for e in exs]))
    codes = codes.reshape(num, -1)

    @jax.jit
    def token_ce(b, c):
        logits = model.image_logits(b, c)
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, c[..., None], -1)[..., 0]

    ce = {"cond": [], "uncond": []}
    for start in range(0, num, batch):
        b = {
            k: np.stack([r[k] for r in rows[start : start + batch]])
            for k in ("prompt_ids", "uncond_ids", "prompt_mask", "positions")
        }
        c = jnp.asarray(codes[start : start + batch])
        ce["cond"].append(np.asarray(token_ce(b, c)))
        ce["uncond"].append(np.asarray(token_ce(b | {"prompt_ids": b["uncond_ids"]}, c)))
    ce = {k: np.concatenate(v) for k, v in ce.items()}  # [num, N]
    background = (cells == np.array(shapes.BACKGROUND, np.uint8)).all(axis=(2, 4, 5)).reshape(num, -1)
    first = np.zeros_like(background)
    has_object = (~background).any(axis=1)
    first[np.flatnonzero(has_object), np.argmax(~background, axis=1)[has_object]] = True
    out = {}
    for kind, mask in (("background", background), ("object", ~background), ("first_object", first)):
        cond, uncond = (float(ce[k][mask].mean()) for k in ("cond", "uncond"))
        out[kind] = {"cond": cond, "uncond": uncond, "gain": uncond - cond}
    return out


def vq_report(vq_model, *, per_task: int, seed: int = 0, usage_images: int = 1024, locality_edits: int = 128) -> dict:
    """`vq_ceiling` (ShapeEval + PSNR of round trips), `code_statistics` over `usage_images` renders
    and `edit_code_locality` over `locality_edits` edit pairs of a trained VQModel; the two counts
    are in the result."""
    size = vq_model.cfg.image_size
    codes_of = lambda images: vq_call(vq_model, "encode_to_codes", jax.numpy.asarray(to_float(images, size)))
    decode = lambda codes: to_uint8(vq_call(vq_model, "decode_codes", codes))
    out = vq_ceiling(lambda images: decode(codes_of(images)), per_task=per_task, seed=seed, resolution=size)
    out.update(code_statistics(codes_of, vq_model.cfg.codebook_size, num=usage_images, seed=seed))
    out.update(edit_code_locality(codes_of, num=locality_edits, seed=seed))
    return out | {"usage_images": usage_images, "locality_edits": locality_edits}
