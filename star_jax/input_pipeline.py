"""The input pipeline of every stage on Grain: records -> per-example arrays -> process-local batches.

  make_iterator(config, split=, process_index=, process_count=) -> PipelineIterator

Pipeline (all seeded by `config.data.shuffle_seed`, so the same seed gives the same batches):

  indices [0, n) -> this process's shard [process_index::process_count] -> shuffle(seed)
(train split only)
  -> repeat(num_epochs) -> load + validate + assemble (star_jax.sequences, chat template)
  -> seeded random ops (VQ stage: horizontal flip) -> drop and count bad records (SkipBad)
  -> batch(batch_size // process_count) -> worker processes (config.data.num_workers)
  -> accounting in the main process (stats, log line, bad-fraction check)

Sources: the procedurally generated shapes world (`config.data.source = "shapes"`: random access by
index, no files) or a tfds ArrayRecord dataset directory (`"arrayrecord"`, `config.data.path`):
data/shapes_world.py output, user data converted by data/convert.py, or VQ-pretokenised records.

Batches per stage (numpy, batch first, B = batch_size // process_count; Tp = max_prompt_len,
N = VQ codes per image, P = ViT patches per image):
  vq             images [B, H, W, 3] float32 in [-1, 1]
  vision         pixels [B, P, patch_dim] float32 and, by `config.data.vision_labels`:
                 caption_words [B, V] float32 (1 where vocabulary word v is a token of the image's
                 caption, else 0; V = model.decoder.vocab_size), or scene_cells / scene_cover: cell_shape,
                 cell_color [B, G * G] int32 (shapes world; see `scene_cell_targets`), + cell_centre
                 [B, G * G, 2] float32 with data.scene_centres, + cell_relations [B, G * G, R * S * C]
                 float32 with data.scene_relations (`object_relations`), + cell_counts [B, G * G, 3]
                 int32 with data.scene_counts (`object_counts`)
  generation     prompt_ids, uncond_ids [B, Tp] int32, prompt_mask [B, Tp] bool, positions [B, 3, Tp + N]
                 int32, and codes [B, N] int32 (pretokenized) or images [B, H, W, 3] float32
  editing        the generation keys + src_mask, vit_mask [B, Tp] bool, pixels [B, P, patch_dim]
                 float32, src_codes [B, N] int32 / src_images [B, H, W, 3] float32
  understanding  prompt_ids, prompt_mask, text_targets [B, Tp] (-1 = no loss), vit_mask, positions
                 [B, 3, Tp], pixels [B, P, patch_dim]
Prompts are left-padded to Tp (no packing: the loss masks are `prompt_mask` / `text_targets`).

Bad records (records.REASONS) never crash the run: they become `Skipped` sentinels, are dropped,
counted per reason (`PipelineIterator.stats()`, keys `data/...`) and logged; when more than
`config.data.max_bad_fraction` of the records seen (after `config.data.bad_check_after`) are bad,
the iterator raises `records.BadDataError` naming the fraction, the threshold and the reasons.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import grain
import numpy as np

from star_jax import records, sequences

# The understanding stage's captioning turn: question of the `caption_fraction` of shapes-world
# examples whose answer is the scene's free-form caption (every object's colour, shape and count).
CAPTION_QUESTION = "describe this image."
STAGE_KIND = {"vq": "pairs", "vision": "pairs", "generation": "pairs", "understanding": "qa", "editing": "edits"}
SHAPES_KIND = {"pairs": "pair", "qa": "qa", "edits": "edit"}  # star_jax.shapes.make_example kinds
READ_THREADS = 2  # threads per process (or worker) that load and assemble examples
MAX_LOGGED = 20  # bad records logged one by one per iterator; later ones only in the periodic summary
LOG_EVERY_S = 60.0


def load_tokenizer(name: str):
    """'builtin' -> the shapes world's word-level tokenizer; a path -> HF tokenizer.json wrapper."""
    from star_jax.text import tokenizer as tokenizer_lib

    return tokenizer_lib.load_tokenizer(name)


# ------------------------------------------------------------------------------------------------
# What one example needs (picklable: it travels into Grain worker processes)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """Stage, sizes and validation limits of one example, from the config."""

    stage: str
    tokenizer: str
    max_prompt_len: int
    vq_image_size: int
    vq_grid: int  # codes per side; N = vq_grid ** 2
    codebook_size: int
    vit_image_size: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    pretokenized: bool
    vocab_size: int
    min_image_size: int
    max_aspect_ratio: float
    vision_labels: str = "caption_words"
    scene_centres: bool = False
    scene_relations: bool = False
    scene_counts: bool = False
    question_first: bool = False

    @classmethod
    def from_config(cls, config) -> ExampleSpec:
        if config.stage not in STAGE_KIND:
            raise ValueError(f"config.stage={config.stage!r} has no input pipeline; known: {sorted(STAGE_KIND)}")
        from star_jax.models import vq as vq_model

        vq, vision, data = config.model.vq, config.model.vision, config.data
        if config.stage in ("vision", "understanding", "editing"):
            vit_grid(config)  # validates vit_image_size against the patch grid
        return cls(
            stage=config.stage,
            tokenizer=data.tokenizer,
            max_prompt_len=data.max_prompt_len,
            vq_image_size=vq.image_size,
            vq_grid=vq_model.grid_size(vq),
            codebook_size=vq.codebook_size,
            vit_image_size=data.vit_image_size,
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            pretokenized=bool(data.pretokenized),
            vocab_size=config.model.decoder.vocab_size,
            min_image_size=data.min_image_size,
            max_aspect_ratio=data.max_aspect_ratio,
            vision_labels=data.get("vision_labels", "caption_words"),
            scene_centres=bool(data.get("scene_centres", False)),
            scene_relations=bool(data.get("scene_relations", False)),
            scene_counts=bool(data.get("scene_counts", False)),
            question_first=bool(data.get("question_first", False)),
        )

    @property
    def kind(self) -> str:
        return STAGE_KIND[self.stage]

    @property
    def num_codes(self) -> int:
        return self.vq_grid**2

    @property
    def render_size(self) -> int:
        """Resolution the shapes world is rendered at for this stage."""
        if self.stage in ("vision", "understanding"):
            return self.vit_image_size
        if self.stage == "editing":
            return max(self.vq_image_size, self.vit_image_size)
        return self.vq_image_size


def vit_grid(config) -> tuple[int, int, int]:
    """(t, h, w) patch grid of the ViT input of `config` (fixed: every image is resized to a square)."""
    s, p = config.data.vit_image_size, config.model.vision.patch_size
    factor = p * config.model.vision.spatial_merge_size
    if s % factor:
        raise ValueError(f"config.data.vit_image_size={s} must be a multiple of patch * merge = {factor}")
    return (1, s // p, s // p)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Sentinel for a bad record: where it came from and why it was skipped."""

    index: int
    reason: str
    detail: str


COVER_FRACTION = 0.1  # scene_cover: least fraction of a cell an object must paint to label it
_COVER_SAMPLES = 8  # scene_cover: sample points per cell side


def scene_cell_objects(objects, grid: int, *, cover: bool = False) -> np.ndarray:
    """Which object labels each merged ViT token in the vision stage's scene objectives.

    objects: [[shape, colour, x, y, size], ...] (a shapes-world scene; centres as fractions of the
    image side); grid: merged tokens per side (G). Returns [G * G] int32 in the merged tokens'
    raster order: the index in `objects` of the object whose centre lies in the cell, -1 where none
    does. Two centres in one cell (rare: boxes keep a margin) give it the larger object.
    cover=True (vision_labels='scene_cover') also gives every other cell to the object that paints
    most of it, when that is at least COVER_FRACTION (8 x 8 sample points per cell), so every token
    an object covers names its shape, as every covered token shows its colour.
    """
    from star_jax.shapes import scene as scene_lib
    from star_jax.shapes.render import shape_mask

    owner = np.full(grid * grid, -1, np.int32)
    size_of = np.zeros(grid * grid)
    coverage = np.zeros((len(objects), grid * grid))
    points = (np.arange(grid * _COVER_SAMPLES) + 0.5) / (grid * _COVER_SAMPLES)
    for k, (shape, color, x, y, size) in enumerate(objects):
        scene_lib.check_shape(shape, "objects")
        scene_lib.check_color(color, "objects")
        row, col = (min(max(int(v * grid), 0), grid - 1) for v in (y, x))
        cell = row * grid + col
        if size > size_of[cell]:
            owner[cell], size_of[cell] = k, size
        if cover:
            half = size / 2
            inside = shape_mask(shape, (points[None, :] - x) / half, (points[:, None] - y) / half)
            s = _COVER_SAMPLES
            coverage[k] = inside.reshape(grid, s, grid, s).mean(axis=(1, 3)).reshape(-1)
    if cover and len(objects):
        free = (owner < 0) & (coverage.max(0) >= COVER_FRACTION)
        owner[free] = coverage.argmax(0)[free]
    return owner


def scene_cell_targets(
    objects, grid: int, *, cover: bool = False, relations: bool = False, counts: bool = False
) -> dict[str, np.ndarray]:
    """Dense targets of the vision stage's scene objectives, one per merged ViT token, from the
    object `scene_cell_objects(objects, grid, cover=cover)` gives each cell.

    Returns cell_shape, cell_color [G * G] int32 (1 + the index in shapes.SHAPES / shapes.COLORS,
    0 where no object) and cell_centre [G * G, 2] float32 (that object's centre (x, y) in cells of
    the merged grid, 0 where none; the `data.scene_centres` targets); with relations=True also
    cell_relations [G * G, R * S * C] float32, that object's `object_relations` (1 / 0 / -1 =
    ignored; 0 where none; the `data.scene_relations` targets); with counts=True also cell_counts
    [G * G, 3] int32, `object_counts` of the cell's object (every cell holds the scene's object count;
    the two per-object counts are 0 where no object; the `data.scene_counts` targets).
    """
    from star_jax.shapes import scene as scene_lib

    owner = scene_cell_objects(objects, grid, cover=cover)  # -1 picks each table's trailing "none"
    shape_ids = np.array([1 + scene_lib.SHAPES.index(o[0]) for o in objects] + [0], np.int32)
    color_ids = np.array([1 + list(scene_lib.COLORS).index(o[1]) for o in objects] + [0], np.int32)
    centres = np.array([[o[2] * grid, o[3] * grid] for o in objects] + [[0.0, 0.0]], np.float32)
    targets = {"cell_shape": shape_ids[owner], "cell_color": color_ids[owner], "cell_centre": centres[owner]}
    if relations:
        targets["cell_relations"] = object_relations(objects)[owner].reshape(grid * grid, -1)
    if counts:
        targets["cell_counts"] = object_counts(objects)[owner]
    return targets


def object_counts(objects) -> np.ndarray:
    """How many objects a question about each object of a shapes-world scene counts: [K + 1, 3]
    int32 (K objects): the scene's objects, those of the object's shape, those of its shape and
    colour; the last row (empty cells) is (objects, 0, 0). "How many circles are there?" is a
    number of a circle's tokens, read as "what color is the circle?" is read; "how many objects are
    there?" a number of any token."""
    shapes_ = [o[0] for o in objects]
    kinds = [(o[0], o[1]) for o in objects]
    rows = [[len(objects), shapes_.count(o[0]), kinds.count((o[0], o[1]))] for o in objects]
    return np.array(rows + [[len(objects), 0, 0]], np.int32)


def object_relations(objects) -> np.ndarray:
    """Which objects stand in which relation to each object of a shapes-world scene: [K + 1, R, S,
    C] float32 (K objects, R = shapes.RELATIONS, S = SHAPES, C = COLORS; the last row all 0, for
    empty cells). [k, r, s, c] is 1 when an object of shape s and colour c is clearly
    (`scene.clear_relations`) RELATIONS[r] object k, -1 when one only might be
    (`scene.unclear_relations`, a band no question asks about: the loss ignores it), else 0.
    "Is A left of B?" is one bit of B's row, read as "is there an A?" is read."""
    from star_jax.shapes import scene as scene_lib

    objs = [scene_lib.Obj(shape, color, x, y, size) for shape, color, x, y, size in objects]
    colors = list(scene_lib.COLORS)
    bits = np.zeros((len(objs) + 1, len(scene_lib.RELATIONS), len(scene_lib.SHAPES), len(colors)), np.float32)
    for k, b in enumerate(objs):
        for a in objs:
            if a is b:
                continue
            clear, loose = scene_lib.clear_relations(a, b), scene_lib.unclear_relations(a, b)
            for rel in clear | loose:
                index = k, scene_lib.RELATIONS.index(rel), scene_lib.SHAPES.index(a.shape), colors.index(a.color)
                bits[index] = 1.0 if rel in clear or bits[index] == 1 else -1.0
    return bits


# ------------------------------------------------------------------------------------------------
# Sources


class ShapesSource:
    """The procedurally generated shapes world as a random-access source of decoded records.

    [i] -> the record of `kind` (pairs | qa | edits) with uint8 [R, R, 3] images and str text:
    `star_jax.shapes.make_example(split, i, ...)`, a pure function of (split, i, seed).
    Understanding records ('qa'): `caption_fraction` of them ask for the scene's free-form caption
    instead of one question; with `qa_per_image` > 1 each also carries `follow_ups`, that many - 1
    more questions about the same scene (JSON `[[question, answer], ...]`).
    `count_present_fraction` of the QA records (not captions) instead count an object that is in
    the scene (`captions.count_present_question`; the evaluation's questions are unchanged).
    `grounding_fraction` of the QA turns (first and follow-ups; not captions) instead ask where an
    object is (`captions.grounding_question`: "where in the image is the red circle?" -> "(3, 7)").
    `qa_kind_weights` (one per `captions.QA_KINDS`; empty = uniform) redraws the QA records'
    questions (and follow-ups) with those kind frequencies: the training mixture, not the evaluation's.
    `position_reasoning`: position answers (first and follow-ups) give both objects' points first
    (`captions.reason_about_position`: "(3, 7) (6, 2): no"); evaluation scores the final answer.
    Pairs: `pair_tags` restricts them to those tags (index i gets pair_tags[i % len]; empty = all).
    """

    def __init__(
        self,
        split: str,
        kind: str,
        num_examples: int,
        *,
        resolution: int,
        seed: int = 0,
        caption_fraction: float = 0.0,
        qa_per_image: int = 1,
        pair_tags: tuple[str, ...] = (),
        count_present_fraction: float = 0.0,
        qa_kind_weights: tuple[float, ...] = (),
        grounding_fraction: float = 0.0,
        position_reasoning: bool = False,
    ):
        self.count_present_fraction, self.grounding_fraction = count_present_fraction, grounding_fraction
        self.position_reasoning = position_reasoning
        self.qa_kind_weights = tuple(qa_kind_weights) or None
        self.split, self.kind, self.num_examples = split, kind, num_examples
        self.resolution, self.seed, self.caption_fraction = resolution, seed, caption_fraction
        self.qa_per_image, self.pair_tags = qa_per_image, tuple(pair_tags)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        from star_jax import shapes

        if self.kind == "qa":
            if self.caption_fraction and self._is_caption(index):
                ex = shapes.make_example(
                    self.split, int(index), "pair", seed=self.seed, resolution=self.resolution, tag="free_form"
                )
                ex |= {"question": CAPTION_QUESTION, "answer": ex["caption"]}
            else:
                ex = shapes.make_example(self.split, int(index), "qa", seed=self.seed, resolution=self.resolution)
                if self.qa_kind_weights:
                    ex = self._weighted_question(index, ex)
                if self.count_present_fraction:
                    ex = self._maybe_count_present(index, ex)
            grounding = self._grounding_rng(index)
            if grounding is not None and ex["question"] != CAPTION_QUESTION:
                q, a = self._maybe_grounding(grounding, ex, ex["question"], ex["answer"])
                ex = ex | {"question": q, "answer": a}
            answer = self._reasoned(ex, ex["question"], ex["answer"])
            record = {"image": ex["image"], "question": ex["question"], "answer": answer}
            if self.qa_per_image > 1:
                record["follow_ups"] = records.json_dumps(self._follow_ups(index, ex, grounding))
            return record
        tag = self.pair_tags[int(index) % len(self.pair_tags)] if self.kind == "pairs" and self.pair_tags else None
        ex = shapes.make_example(
            self.split, int(index), SHAPES_KIND[self.kind], seed=self.seed, resolution=self.resolution, tag=tag
        )
        if self.kind == "pairs":
            objects = [[o.shape, o.color, o.x, o.y, o.size] for o in ex["scene"].objects]
            return {
                "image": ex["image"],
                "caption": ex["caption"],
                "metadata": records.json_dumps(ex["metadata"]),
                "objects": records.json_dumps(objects),  # the scene itself (scene vision_labels)
            }
        return {k: ex[k] for k in ("source_image", "instruction", "target_image")}

    def _follow_ups(self, index: int, ex: dict, grounding: np.random.Generator | None = None) -> list[list[str]]:
        """`qa_per_image - 1` more questions about the example's scene (after its QA or captioning
        turn), none asked twice: [[q, a], ...]; a pure function of (seed, split, index). With
        `grounding` (the record's grounding RNG), each may become a grounding question."""
        from star_jax.shapes import captions
        from star_jax.shapes.scene import SPLITS

        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index), 0xF0])
        asked, out = {ex["question"]}, []
        for _ in range(20 * self.qa_per_image):  # a scene with one object admits few distinct questions
            if len(out) == self.qa_per_image - 1:
                break
            q, a, _ = captions.question(rng, ex["scene"], split=self.split, kind_weights=self.qa_kind_weights)
            if grounding is not None:
                q, a = self._maybe_grounding(grounding, ex, q, a)
            if q not in asked:
                asked.add(q)
                out.append([q, self._reasoned(ex, q, a)])
        return out

    def _reasoned(self, ex: dict, q: str, a: str) -> str:
        """`a`, or with `position_reasoning` a position question's answer with its grounding first."""
        if not self.position_reasoning:
            return a
        from star_jax.shapes import captions

        return captions.reason_about_position(ex["scene"], q, a) or a

    def _weighted_question(self, index: int, ex: dict) -> dict:
        """The example's question redrawn with `qa_kind_weights` (a pure function of seed, split, index)."""
        from star_jax.shapes import captions
        from star_jax.shapes.scene import SPLITS

        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index), 0x9A])
        q, a, kind = captions.question(rng, ex["scene"], split=self.split, kind_weights=self.qa_kind_weights)
        return ex | {"question": q, "answer": a, "qa_kind": kind}

    def _maybe_count_present(self, index: int, ex: dict) -> dict:
        """With probability `count_present_fraction` (a pure function of seed, split, index), the
        example's question becomes a count of an object in its scene (`captions.count_present_question`)."""
        from star_jax.shapes import captions
        from star_jax.shapes.scene import SPLITS

        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index), 0xC07])
        if rng.random() >= self.count_present_fraction:
            return ex
        q, a, _ = captions.count_present_question(rng, ex["scene"], split=self.split)
        return ex | {"question": q, "answer": a}

    def _grounding_rng(self, index: int) -> np.random.Generator | None:
        """The record's RNG of grounding draws (a pure function of seed, split, index); None when
        `grounding_fraction` is 0, so that every other draw of the stream stays as it was."""
        from star_jax.shapes.scene import SPLITS

        if not self.grounding_fraction:
            return None
        return np.random.default_rng([self.seed, SPLITS.index(self.split), int(index), 0x6D])

    def _maybe_grounding(self, rng: np.random.Generator, ex: dict, q: str, a: str) -> tuple[str, str]:
        """(q, a), or with probability `grounding_fraction` a grounding question about the scene
        (`captions.grounding_question`: where an object is, as "(x, y)" in tenths of the image)."""
        from star_jax.shapes import captions

        if rng.random() >= self.grounding_fraction:
            return q, a
        grounded = captions.grounding_question(rng, ex["scene"], split=self.split)
        return (q, a) if grounded is None else grounded[:2]

    def _is_caption(self, index: int) -> bool:
        """A pure function of (seed, split, index), like the examples themselves."""
        from star_jax.shapes.scene import SPLITS

        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index), 0xCA9])
        return bool(rng.random() < self.caption_fraction)


def make_source(config, split: str, spec: ExampleSpec):
    """(source, parser): a random-access source of `split` and the bytes -> record parser (or None)."""
    data = config.data
    if data.source == "shapes":
        if spec.pretokenized:
            raise ValueError("config.data.pretokenized=True needs source='arrayrecord' (data/pretokenize_vq.py output)")
        n = data.num_train_examples if split == "train" else data.num_eval_examples
        understanding = spec.stage == "understanding"
        source = ShapesSource(
            split,
            spec.kind,
            n,
            resolution=spec.render_size,
            seed=config.seed,
            caption_fraction=data.caption_fraction if understanding else 0.0,
            qa_per_image=data.get("qa_per_image", 1) if understanding else 1,
            pair_tags=tuple(data.get("pair_tags", ())) if spec.kind == "pairs" else (),
            count_present_fraction=data.get("count_present_fraction", 0.0) if understanding else 0.0,
            qa_kind_weights=tuple(data.get("qa_kind_weights", ())) if understanding else (),
            grounding_fraction=data.get("grounding_fraction", 0.0) if understanding else 0.0,
            position_reasoning=bool(data.get("position_reasoning", False)) and understanding,
        )
        return source, None
    if data.source == "arrayrecord":
        if not data.path:
            raise ValueError("config.data.source='arrayrecord' needs config.data.path (a tfds dataset directory)")
        directory = records.resolve_dataset_dir(data.path, spec.kind)
        return records.ArrayRecordSource(directory, split), records.RecordParser(directory)
    raise ValueError(f"config.data.source={data.source!r}: expected 'shapes' or 'arrayrecord'")


# ------------------------------------------------------------------------------------------------
# Per example


class PrepareExample:
    """index -> the example dict of `spec.stage` (see the module docstring), or a `Skipped`."""

    def __init__(self, source, parser, spec: ExampleSpec):
        self.source, self.parser, self.spec = source, parser, spec
        self._tokenizer = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.spec.tokenizer)
        return self._tokenizer

    def read(self, index: int) -> dict:
        """The record at `index`, parsed (bytes -> dict) when the source is serialised."""
        raw = self.source[int(index)]
        return self.parser(raw) if self.parser is not None else raw

    def __call__(self, index: int):
        try:
            return self.assemble(self.read(index))
        except records.BadRecord as e:
            return Skipped(int(index), e.reason, e.detail)
        except sequences.SequenceTooLong as e:
            return Skipped(int(index), "too_long", str(e))
        except Exception as e:  # anything else a record can trigger is counted, not fatal
            return Skipped(int(index), "other", f"{type(e).__name__}: {e}")

    def image(self, record: dict, name: str) -> np.ndarray:
        """record[name] as uint8 [H, W, 3], within the spec's size and aspect limits (or BadRecord)."""
        s = self.spec
        return records.decode_image(
            records.field(record, name), name, min_size=s.min_image_size, max_aspect=s.max_aspect_ratio
        )

    def _target(self, out: dict, record: dict, image_field: str, codes_field: str, key: str) -> None:
        """Adds `<key>codes` [N] int32 (pretokenized) or `<key>images` [H, W, 3] float32."""
        s = self.spec
        if s.pretokenized:
            out[f"{key}codes"] = records.check_codes(
                records.field(record, codes_field), codes_field, num_codes=s.num_codes, codebook_size=s.codebook_size
            )
        else:
            image = records.square_image(self.image(record, image_field), s.vq_image_size)
            out[f"{key}images"] = records.to_unit_range(image)

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        """uint8 image -> ViT patches [P, 3 * temporal * patch**2] float32 at the fixed square size."""
        from star_jax.models import vision_preprocess

        s = self.spec
        size = s.vit_image_size
        pixels, _ = vision_preprocess.preprocess(
            [records.square_image(image, size)],
            min_pixels=size * size,
            max_pixels=size * size,
            patch_size=s.patch_size,
            merge_size=s.merge_size,
            temporal_patch_size=s.temporal_patch_size,
        )
        return pixels

    def assemble(self, record: dict) -> dict:
        s = self.spec
        grid = (1, s.vit_image_size // s.patch_size, s.vit_image_size // s.patch_size)
        text = lambda name: records.decode_text(records.field(record, name), name)
        if s.stage == "vq":
            image = records.square_image(self.image(record, "image"), s.vq_image_size)
            return {"images": records.to_unit_range(image)}
        if s.stage == "vision":
            out = {"pixels": self._pixels(self.image(record, "image"))}
            if s.vision_labels != "caption_words":  # scene_cells | scene_cover (validated)
                objects = records.decode_objects(records.field(record, "objects"))
                grid = s.vit_image_size // (s.patch_size * s.merge_size)
                cover = s.vision_labels == "scene_cover"
                targets = scene_cell_targets(
                    objects, grid, cover=cover, relations=s.scene_relations, counts=s.scene_counts
                )
                if not s.scene_centres:
                    del targets["cell_centre"]
                out |= targets
            else:
                out["caption_words"] = sequences.bag_of_words(self.tokenizer, text("caption"), s.vocab_size)
            return out
        if s.stage == "generation":
            out = sequences.generation_example(
                self.tokenizer, text("caption"), max_prompt_len=s.max_prompt_len, num_image_tokens=s.num_codes
            )
            self._target(out, record, "image", "codes", "")
            return out
        if s.stage == "editing":
            out = sequences.editing_example(
                self.tokenizer,
                text("instruction"),
                max_prompt_len=s.max_prompt_len,
                num_vq_tokens=s.num_codes,
                vit_grid_thw=grid,
                spatial_merge_size=s.merge_size,
            )
            source = self.image(record, "source_image")
            out["pixels"] = self._pixels(source)
            if s.pretokenized:
                self._target(out, record, "source_image", "source_codes", "src_")
            else:
                out["src_images"] = records.to_unit_range(records.square_image(source, s.vq_image_size))
            self._target(out, record, "target_image", "target_codes", "")
            return out
        out = sequences.understanding_example(
            self.tokenizer,
            text("question"),
            text("answer"),
            max_prompt_len=s.max_prompt_len,
            vit_grid_thw=grid,
            spatial_merge_size=s.merge_size,
            follow_ups=records.decode_turns(record["follow_ups"]) if record.get("follow_ups") is not None else (),
            question_first=s.question_first,
        )
        out["pixels"] = self._pixels(self.image(record, "image"))
        return out


def random_flip(example, rng: np.random.Generator):
    """Seeded random op of the VQ stage: horizontal flip of `images` with probability 1/2."""
    if isinstance(example, Skipped) or rng.random() >= 0.5:
        return example
    return {**example, "images": np.ascontiguousarray(example["images"][:, ::-1])}


# ------------------------------------------------------------------------------------------------
# Bad-record accounting


def check_bad_fraction(bad: np.ndarray, seen: int, max_fraction: float, check_after: int) -> None:
    """Raises records.BadDataError when sum(bad) / seen > max_fraction (once seen >= check_after)."""
    total = int(np.sum(bad))
    if seen >= max(check_after, 1) and total > max_fraction * seen:
        reasons = {r: int(n) for r, n in zip(records.REASONS, bad) if n}
        raise records.BadDataError(
            f"{total} of {seen} records are bad ({total / seen:.2%}), more than "
            f"config.data.max_bad_fraction={max_fraction:.2%}; by reason: {reasons}. "
            "Fix or filter the data (see data/README.md), or raise the threshold."
        )


class _SkipBadIterator(grain.DatasetIterator):
    """Drops `Skipped` sentinels; attaches to the next good example `_bad` [len(REASONS)] int32, the
    skips since the previous one (so counts survive worker processes and batching)."""

    def __init__(self, parent, max_fraction: float, check_after: int):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_fraction, check_after
        self._bad = np.zeros(len(records.REASONS), np.int64)
        self._seen = 0

    def __next__(self):
        pending = np.zeros(len(records.REASONS), np.int32)
        while True:
            try:
                example = next(self._parent)
            except StopIteration:
                if pending.any():  # nothing left to carry them: they only reach this log line
                    logging.warning(
                        "data: %d bad records after the last good one at the end of the data", pending.sum()
                    )
                raise
            self._seen += 1
            if not isinstance(example, Skipped):
                return {**example, "_bad": pending}
            pending[records.REASON_INDEX[example.reason]] += 1
            self._bad[records.REASON_INDEX[example.reason]] += 1
            if self._bad.sum() <= MAX_LOGGED:
                logging.warning("data: skipped record %d (%s): %s", example.index, example.reason, example.detail)
            check_bad_fraction(self._bad, self._seen, self._max_fraction, self._check_after)

    def get_state(self):
        return {"parent": self._parent.get_state(), "bad": self._bad.tolist(), "seen": self._seen}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._bad = np.asarray(state["bad"], np.int64)
        self._seen = int(state["seen"])


class SkipBad(grain.IterDataset):
    """IterDataset transform: see `_SkipBadIterator`."""

    def __init__(self, parent, max_fraction: float, check_after: int):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_fraction, check_after

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__(), self._max_fraction, self._check_after)


class PipelineIterator(grain.DatasetIterator):
    """The iterator `make_iterator` returns: process-local numpy batches; counts records seen and
    skipped per reason across all workers; checkpointable (`get_state` / `set_state` are JSON)."""

    def __init__(self, parent, *, max_fraction: float, check_after: int, description: str = ""):
        super().__init__(parent)
        self._max_fraction, self._check_after = max_fraction, check_after
        self._description = description
        self._bad = np.zeros(len(records.REASONS), np.int64)
        self._seen = 0
        self._logged_bad, self._last_log = 0, 0.0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        bad = batch.pop("_bad").sum(axis=0)
        self._bad += bad
        self._seen += int(batch[next(iter(batch))].shape[0] + bad.sum())
        total = int(self._bad.sum())
        if total > self._logged_bad and (time.monotonic() - self._last_log > LOG_EVERY_S or not self._logged_bad):
            logging.warning(
                "data%s: skipped %d bad of %d records (%.3f%%): %s",
                self._description,
                total,
                self._seen,
                100 * total / self._seen,
                self._reasons(),
            )
            self._logged_bad, self._last_log = total, time.monotonic()
        check_bad_fraction(self._bad, self._seen, self._max_fraction, self._check_after)
        return batch

    def _reasons(self) -> dict[str, int]:
        return {r: int(n) for r, n in zip(records.REASONS, self._bad) if n}

    def stats(self) -> dict[str, float]:
        """{'data/records_seen', 'data/records_bad', 'data/bad_fraction', 'data/bad/<reason>'...} so far."""
        total = int(self._bad.sum())
        out = {"data/records_seen": float(self._seen), "data/records_bad": float(total)}
        out["data/bad_fraction"] = total / self._seen if self._seen else 0.0
        out |= {f"data/bad/{r}": float(n) for r, n in self._reasons().items()}
        return out

    def get_state(self):
        return {"pipeline": self._parent.get_state(), "bad": self._bad.tolist(), "seen": self._seen}

    def set_state(self, state):
        self._parent.set_state(state["pipeline"])
        self._bad = np.asarray(state["bad"], np.int64)
        self._seen = int(state["seen"])

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def _ensure_flags_parsed(*unused) -> None:
    """Grain's multiprocessing reads absl flags (in the main process and in workers): outside
    `app.run` (tests, notebooks) mark them parsed so their defaults apply."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------------------------------------
# The pipeline


def make_dataset(config, *, split: str = "train", process_index: int = 0, process_count: int = 1, num_epochs=None):
    """The Grain IterDataset of `config.stage` for one process, before accounting: batches carry
    `_bad` [B, len(REASONS)] int32, the skips before each row."""
    spec = ExampleSpec.from_config(config)
    batch_size = config.train.batch_size
    if batch_size % process_count:
        raise ValueError(f"config.train.batch_size={batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    source, parser = make_source(config, split, spec)
    seed = config.data.shuffle_seed
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    if split == "train":  # evaluation splits are read in order
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(PrepareExample(source, parser, spec))
    if spec.stage == "vq":
        ds = ds.random_map(random_flip, seed=seed + 1)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=4 * READ_THREADS))
    ds = SkipBad(ds, config.data.max_bad_fraction, config.data.bad_check_after)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    if config.data.num_workers > 0:
        _ensure_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=config.data.num_workers)
        ds = ds.mp_prefetch(options, worker_init_fn=_ensure_flags_parsed)
    return ds


def make_iterator(config, *, split: str = "train", process_index: int = 0, process_count: int = 1, num_epochs=None):
    """Process-local batches of `config.stage` (see the module docstring) as a checkpointable
    `PipelineIterator` (a grain DatasetIterator); `num_epochs=None` repeats forever."""
    ds = make_dataset(
        config, split=split, process_index=process_index, process_count=process_count, num_epochs=num_epochs
    )
    return PipelineIterator(
        iter(ds),
        max_fraction=config.data.max_bad_fraction,
        check_after=config.data.bad_check_after,
        description=f"[{config.stage}/{split} {process_index}/{process_count}]",
    )
