"""projects/shapes/data.py: the understanding mixture source ("shapes_mix": caption fraction, questions
per image, grounding fraction, validation) and the vision stage's labels (caption words, scene cells)."""

import json

import numpy as np
import pytest

from star_jax import records, shapes, stages
from star_jax.configs import star as star_config
from star_jax.input import pipeline, sources
from star_jax.projects.shapes import data
from star_jax.projects.shapes import vision as _vision  # noqa: F401  registers the vision stage
from star_jax.text import tokenizer as tokenizer_lib

IMPORTS = ("star_jax.projects.shapes.data", "star_jax.projects.shapes.vision")


def make_config(stage="understanding", batch_size=4, **data_keys):
    config = star_config.get_config(f"size=tiny,stage={stage},runlocal")
    config.imports = IMPORTS
    config.train.batch_size = batch_size
    config.data.source = data.SOURCE
    config.data.num_train_examples = 24
    config.data.num_eval_examples = 8
    config.data.max_prompt_len = 96
    for key, value in data_keys.items():
        config.data[key] = value
    return config


# ------------------------------------------------------------------------------------------------
# The understanding mixture


def test_defaults_and_other_kinds_are_the_core_shapes_stream():
    for kind in ("pairs", "qa", "edits"):
        mixed = data.MixSource("train", kind, 10, resolution=32, seed=1)
        core = sources.ShapesSource("train", kind, 10, resolution=32, seed=1)
        for i in range(4):
            a, b = mixed[i], core[i]
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    captioned = data.MixSource("train", "pairs", 10, resolution=32, caption_fraction=1.0, qa_per_image=3)
    assert captioned[3]["caption"] == sources.ShapesSource("train", "pairs", 10, resolution=32)[3]["caption"]


def test_caption_fraction_mixes_captioning_turns_into_understanding():
    source = data.MixSource("train", "qa", 400, resolution=32, caption_fraction=0.25)
    records_ = [source[i] for i in range(400)]
    captions = [i for i, r in enumerate(records_) if r["question"] == data.CAPTION_QUESTION]
    assert 70 <= len(captions) <= 130  # 100 expected
    i = captions[0]
    pair = shapes.make_example("train", i, "pair", resolution=32, tag="free_form")
    assert records_[i]["answer"] == pair["caption"]
    np.testing.assert_array_equal(records_[i]["image"], pair["image"])
    j = next(k for k in range(400) if k not in captions)
    assert records_[j]["answer"] == shapes.make_example("train", j, "qa", resolution=32)["answer"]
    # Deterministic per index; the pipeline's source reads the config's fraction; the batch holds it.
    again = data.MixSource("train", "qa", 400, resolution=32, caption_fraction=0.25)
    assert [again[k]["question"] for k in captions[:5]] == [records_[k]["question"] for k in captions[:5]]
    config = make_config(batch_size=8, caption_fraction=1.0)
    source, parser = sources.make_source(config, "train", stages.get("understanding"))
    assert isinstance(source, data.MixSource) and parser is None and source.caption_fraction == 1.0
    batch = next(pipeline.make_iterator(config))
    tok = tokenizer_lib.load_tokenizer("builtin")
    text = tok.decode([t for t in batch["prompt_ids"][0] if t != tok.pad_id])
    assert data.CAPTION_QUESTION in text


def test_qa_per_image_asks_follow_up_questions_about_the_same_scene():
    source = data.MixSource("train", "qa", 40, resolution=32, caption_fraction=0.5, qa_per_image=4)
    checked = 0
    for i in range(40):
        record = source[i]
        turns = [(record["question"], record["answer"]), *records.decode_turns(record["follow_ups"])]
        assert len({q for q, _ in turns}) == len(turns) <= 4  # distinct questions
        scene = shapes.make_example("train", i, "qa", resolution=32)["scene"]
        if record["question"] == data.CAPTION_QUESTION:
            scene = shapes.make_example("train", i, "pair", resolution=32, tag="free_form")["scene"]
        else:
            assert record["answer"] == shapes.make_example("train", i, "qa", resolution=32)["answer"]
        for q, a in turns[1:]:  # every follow-up answer holds for this record's scene
            expected = _answer(scene, q)
            assert expected in (a, None), (i, q, a, expected)
            checked += expected is not None
    assert checked >= 60  # of about 120 follow-ups; position questions are not recomputed
    assert sum(len(records.decode_turns(source[i]["follow_ups"])) == 3 for i in range(40)) >= 36
    again = data.MixSource("train", "qa", 40, resolution=32, caption_fraction=0.5, qa_per_image=4)
    assert source[7]["follow_ups"] == again[7]["follow_ups"]
    assert "follow_ups" not in data.MixSource("train", "qa", 40, resolution=32)[7]
    # The batch holds one target span per turn.
    config = make_config(batch_size=4, qa_per_image=3, max_prompt_len=128)
    batch = next(pipeline.make_iterator(config))
    im_end = tokenizer_lib.load_tokenizer("builtin").special("<|im_end|>")
    for targets in batch["text_targets"]:
        assert 2 <= int(np.sum(targets == im_end)) <= 3


def _answer(scene, question):
    """The answer to a shapes-world question, recomputed from the scene for the questions whose
    grammar is simple to invert (counts, existence, colour, shape); None for the others."""
    from star_jax.shapes.captions import NUMBERS, make_plural, with_article
    from star_jax.shapes.scene import COLORS, SHAPES

    objs = scene.objects
    if question == "how many objects are there?":
        return NUMBERS[len(objs)]
    for shape in SHAPES:
        if question == f"how many {make_plural(shape)} are there?":
            return NUMBERS[sum(o.shape == shape for o in objs)]
        if question == f"what color is the {shape}?":
            return next(o.color for o in objs if o.shape == shape)
        for color in COLORS:
            if question == f"how many {color} {make_plural(shape)} are there?":
                return NUMBERS[sum(o.shape == shape and o.color == color for o in objs)]
            if question == f"is there {with_article(color)} {shape}?":
                return "yes" if any(o.shape == shape and o.color == color for o in objs) else "no"
    for color in COLORS:
        if question == f"what shape is the {color} object?":
            return next(o.shape for o in objs if o.color == color)
    return None


def test_grounding_fraction_asks_where_objects_are():
    plain = data.MixSource("train", "qa", 60, resolution=32, qa_per_image=3)
    source = data.MixSource("train", "qa", 60, resolution=32, qa_per_image=3, grounding_fraction=0.4)
    grounded = turns = 0
    for i in range(60):
        scene = shapes.make_example("train", i, "qa", resolution=32)["scene"]
        record, base = source[i], plain[i]
        np.testing.assert_array_equal(record["image"], base["image"])
        for q, a in [(record["question"], record["answer"])] + json.loads(record["follow_ups"]):
            turns += 1
            if not q.startswith("where in the image is "):
                continue
            grounded += 1
            named = q.removeprefix("where in the image is the ").removesuffix("?").split()
            matches = [o for o in scene.objects if o.shape == named[-1] and (len(named) == 1 or o.color == named[0])]
            assert len(matches) == 1, (q, scene)  # a unique description
            assert a == f"({int(matches[0].x * 10)}, {int(matches[0].y * 10)})", (q, a, matches[0])
    assert 0.25 * turns <= grounded <= 0.55 * turns, (grounded, turns)
    # Off (the default), the stream is unchanged; on, it is a pure function of (seed, split, index).
    again = data.MixSource("train", "qa", 60, resolution=32, qa_per_image=3, grounding_fraction=0.4)
    assert [again[i]["follow_ups"] for i in range(30)] == [source[i]["follow_ups"] for i in range(30)]
    off = data.MixSource("train", "qa", 60, resolution=32, qa_per_image=3, grounding_fraction=0.0)
    assert [(off[i]["question"], off[i]["follow_ups"]) for i in range(30)] == [
        (plain[i]["question"], plain[i]["follow_ups"]) for i in range(30)
    ]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("caption_fraction", 1.5, r"\[0, 1\]"),
        ("grounding_fraction", -0.1, r"\[0, 1\]"),
        ("caption_fraction", "half", r"\[0, 1\]"),
        ("qa_per_image", 0, "integer >= 1"),
        ("qa_per_image", 2.5, "integer >= 1"),
    ],
)
def test_the_mixture_is_validated_naming_the_key_and_value(key, value, message):
    config = make_config(**{key: value})
    with pytest.raises(ValueError, match=rf"config\.data\.{key}={value!r}: .*{message}"):
        sources.make_source(config, "train", stages.get("understanding"))
    with pytest.raises(ValueError, match=rf"config\.data\.{key}="):
        pipeline.make_iterator(config)


# ------------------------------------------------------------------------------------------------
# The vision stage's labels


def scene_labels(objects, grid, cover=False):
    t = data.scene_cell_targets(objects, grid, cover=cover)
    return t["cell_shape"], t["cell_color"]


def test_scene_cell_labels_mark_each_objects_centre_cell():
    objects = [
        ["circle", "red", 0.1, 0.1, 0.2],  # row 0, col 0
        ["cross", "white", 0.9, 0.3, 0.2],  # row 1, col 3
        ["square", "blue", 0.55, 0.8, 0.18],  # row 3, col 2; shares it with a larger triangle
        ["triangle", "green", 0.7, 0.95, 0.25],
    ]
    shape, color = scene_labels(objects, 4)
    expected_shape, expected_color = np.zeros(16, np.int32), np.zeros(16, np.int32)
    for cell, s, c in ((0, "circle", "red"), (7, "cross", "white"), (14, "triangle", "green")):
        expected_shape[cell] = 1 + shapes.SHAPES.index(s)
        expected_color[cell] = 1 + list(shapes.COLORS).index(c)
    np.testing.assert_array_equal(shape, expected_shape)
    np.testing.assert_array_equal(color, expected_color)
    with pytest.raises(ValueError, match="objects.*hexagon"):
        scene_labels([["hexagon", "red", 0.5, 0.5, 0.2]], 4)


def test_scene_cover_labels_every_cell_an_object_paints_from_the_render():
    objects = [
        ["circle", "red", 0.2, 0.2, 0.3],
        ["cross", "white", 0.75, 0.3, 0.28],
        ["triangle", "green", 0.3, 0.75, 0.25],
        ["diamond", "blue", 0.72, 0.78, 0.2],
    ]
    grid = 4
    centre_shape, _ = scene_labels(objects, grid)
    shape, color = scene_labels(objects, grid, cover=True)
    # Reference: the rendered image at 8 pixels per cell (the labels' sample points), cell by cell.
    scene = shapes.Scene(tuple(shapes.Obj(*o) for o in objects))
    image = shapes.render(scene, grid * 8).reshape(grid, 8, grid, 8, 3).transpose(0, 2, 1, 3, 4)
    for cell in range(grid * grid):
        pixels = image[cell // grid, cell % grid].reshape(-1, 3)
        painted = [(np.all(pixels == shapes.COLORS[c], axis=-1).mean(), s, c) for s, c, *_ in objects]
        fraction, s, c = max(painted)
        if centre_shape[cell]:
            assert shape[cell] == centre_shape[cell]
        elif fraction >= data.COVER_FRACTION:
            assert (shape[cell], color[cell]) == (1 + shapes.SHAPES.index(s), 1 + list(shapes.COLORS).index(c))
        else:
            assert shape[cell] == color[cell] == 0
    assert (shape > 0).sum() > (centre_shape > 0).sum() == 4


def test_scene_cell_centres_give_each_labelled_cell_its_objects_centre():
    objects = [["circle", "red", 0.2, 0.2, 0.3], ["cross", "white", 0.75, 0.3, 0.28]]
    for cover in (False, True):
        targets = data.scene_cell_targets(objects, 4, cover=cover)
        shape, centres = targets["cell_shape"], targets["cell_centre"]
        owner = data.scene_cell_objects(objects, 4, cover=cover)
        assert sorted(targets) == ["cell_centre", "cell_color", "cell_shape"]
        assert centres.shape == (16, 2) and centres.dtype == np.float32
        np.testing.assert_array_equal(owner >= 0, shape > 0)
        for cell in range(16):
            expected = [objects[owner[cell]][2] * 4, objects[owner[cell]][3] * 4] if owner[cell] >= 0 else [0, 0]
            np.testing.assert_allclose(centres[cell], expected, rtol=1e-6)
        assert sorted(set(owner) - {-1}) == [0, 1]


@pytest.mark.parametrize("source", ["shapes", data.SOURCE])
def test_vision_batch_is_pixels_and_the_captions_words(source):
    config = make_config("vision", max_prompt_len=48, source=source)
    batch = next(pipeline.make_iterator(config, split="validation"))  # read in order: row i = index i
    side = config.data.vit_image_size // 14
    assert sorted(batch) == ["caption_words", "pixels"]
    assert batch["pixels"].shape == (4, side * side, 3 * 2 * 14 * 14)
    assert batch["caption_words"].shape == (4, config.model.decoder.vocab_size)
    assert batch["caption_words"].dtype == np.float32
    tok = tokenizer_lib.load_tokenizer("builtin")
    for i in range(4):
        caption = shapes.make_example("validation", i, "pair", resolution=config.data.vit_image_size)["caption"]
        assert set(np.flatnonzero(batch["caption_words"][i])) == set(tok.encode(caption)), caption


@pytest.mark.parametrize("labels", ["scene_cells", "scene_cover"])
def test_vision_batch_on_scene_cells_labels_every_merged_token(labels):
    config = make_config("vision", vision_labels=labels, scene_centres=labels == "scene_cover")
    batch = next(pipeline.make_iterator(config, split="validation"))  # row i = index i
    grid = config.data.vit_image_size // (14 * 2)
    centres = ["cell_centre"] if labels == "scene_cover" else []
    assert sorted(batch) == sorted(["cell_color", "cell_shape", "pixels"] + centres)
    assert batch["cell_shape"].shape == batch["cell_color"].shape == (4, grid * grid)
    for i in range(4):
        scene = shapes.make_example("validation", i, "pair", resolution=config.data.vit_image_size)["scene"]
        objects = [[o.shape, o.color, o.x, o.y, o.size] for o in scene.objects]
        targets = data.scene_cell_targets(objects, grid, cover=labels == "scene_cover")
        shape, color = targets["cell_shape"], targets["cell_color"]
        np.testing.assert_array_equal(batch["cell_shape"][i], shape)
        np.testing.assert_array_equal(batch["cell_color"][i], color)
        if centres:
            np.testing.assert_array_equal(batch["cell_centre"][i], targets["cell_centre"])
        assert (shape > 0).sum() >= 1 and ((shape > 0).sum() <= len(objects) or labels == "scene_cover")


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"vision_labels": "boxes"}, r"config\.data\.vision_labels='boxes': not one of"),
        ({"vision_labels": "scene_cells", "source": "arrayrecord"}, r"vision_labels='scene_cells': .*shapes world"),
        ({"scene_centres": True}, r"config\.data\.scene_centres=True: needs scene labels"),
    ],
)
def test_vision_labels_are_checked_naming_the_key_and_value(keys, message):
    with pytest.raises(ValueError, match=message):
        data.check_vision_labels(make_config("vision", **keys))
    data.check_vision_labels(make_config("vision", vision_labels="scene_cover", scene_centres=True))
