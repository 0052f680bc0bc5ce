"""Deterministic examples of the shapes world by (split, index, kind, seed).

An example is a pure function of its arguments (its generator is seeded with
[seed, split, kind, index]), so any host can produce any example and resuming a data iterator
is exact. Splits: 'train' and 'validation' (independent streams, both free of held-out pairs and
triples), 'heldout' (every example built around a held-out pair or triple).
"""

from __future__ import annotations

import numpy as np

from star_jax.shapes import captions
from star_jax.shapes.render import render
from star_jax.shapes.scene import DEFAULT_WORLD, SPLITS, WorldConfig, random_pair, sample_scene
from star_jax.shapes.shapeeval import GENEVAL_TAGS

KINDS = ("pair", "qa", "edit")
PAIR_TAGS = GENEVAL_TAGS + ("free_form",)
HELDOUT_PAIR_TAGS = ("colors", "position", "color_attr", "free_form")  # tags whose text can name a held-out


def example_rng(split: str, index: int, kind: str, seed: int = 0) -> np.random.Generator:
    """The generator of one example."""
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; expected one of {SPLITS}")
    if kind not in KINDS:
        raise ValueError(f"kind: unknown kind {kind!r}; expected one of {KINDS}")
    if index < 0:
        raise ValueError(f"index: must be >= 0, got {index}")
    return np.random.default_rng([seed, SPLITS.index(split), KINDS.index(kind), index])


def _scene(rng: np.random.Generator, split: str, config: WorldConfig):
    """A random scene; in 'heldout' its first object is a held-out pair."""
    if split != "heldout":
        return sample_scene(rng, config, split=split)
    n = int(rng.integers(1, config.max_objects + 1))
    kinds = [random_pair(rng, config, heldout=True)] + [(None, None)] * (n - 1)
    return sample_scene(rng, config, kinds=kinds, split=split)


def make_example(
    split: str,
    index: int,
    kind: str,
    *,
    seed: int = 0,
    resolution: int = 64,
    config: WorldConfig = DEFAULT_WORLD,
    tag: str | None = None,
) -> dict:
    """One example.

    kind 'pair': {"image": [R, R, 3] uint8, "caption": str, "metadata": GenEval dict, "tag", "scene"}
      (tag drawn uniformly from the six GenEval tags + 'free_form' unless given).
    kind 'qa': {"image", "question", "answer", "qa_kind", "scene"}.
    kind 'edit': {"source_image", "target_image" ([R, R, 3] uint8), "instruction", "edit_kind", "source", "target"}.
    """
    rng = example_rng(split, index, kind, seed)
    if kind == "pair":
        tags = HELDOUT_PAIR_TAGS if split == "heldout" else PAIR_TAGS
        tag = tag or tags[int(rng.integers(len(tags)))]
        if tag == "free_form":
            scene = _scene(rng, split, config)
            caption, metadata = captions.describe(scene, rng, config)
        else:
            scene, metadata = captions.geneval_example(rng, tag, config, split)
            caption = metadata["prompt"]
        return {
            "image": render(scene, resolution),
            "caption": caption,
            "metadata": metadata,
            "tag": tag,
            "scene": scene,
        }
    if kind == "qa":
        scene = _scene(rng, split, config)
        q, a, qa_kind = captions.question(rng, scene, config, split)
        return {"image": render(scene, resolution), "question": q, "answer": a, "qa_kind": qa_kind, "scene": scene}
    while True:  # edit: a few scenes admit no edit (e.g. one object that cannot be referred to)
        source = sample_scene(rng, config, split="train" if split == "heldout" else split)
        result = captions.edit(rng, source, config, split)
        if result is not None:
            break
    instruction, target, edit_kind = result
    return {
        "source_image": render(source, resolution),
        "target_image": render(target, resolution),
        "instruction": instruction,
        "edit_kind": edit_kind,
        "source": source,
        "target": target,
    }
