"""star_jax.input_pipeline: batch schema per stage, determinism, mid-epoch restore (0 and 2 worker
processes), disjoint process shards, and a corrupt-data fixture with 13 kinds of bad record."""

import collections
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

from star_jax import input_pipeline, records, shapes
from star_jax.configs import star as star_config
from star_jax.text import tokenizer as tokenizer_lib


def make_config(stage="generation", batch_size=4, **data):
    config = star_config.get_config(f"size=tiny,stage={stage},runlocal")
    config.train.batch_size = batch_size
    config.data.num_train_examples = 24
    config.data.num_eval_examples = 8
    config.data.max_prompt_len = {"generation": 48, "vq": 48, "vision": 48, "understanding": 96, "editing": 256}[stage]
    for key, value in data.items():
        config.data[key] = value
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_generation_batch_schema():
    config = make_config()
    it = input_pipeline.make_iterator(config)
    batch = next(it)
    tok = tokenizer_lib.load_tokenizer("builtin")
    n, tp = 8 * 8, 48  # tiny VQ: 32 px / 4 -> 8 x 8 codes
    assert sorted(batch) == ["images", "positions", "prompt_ids", "prompt_mask", "uncond_ids"]
    assert batch["prompt_ids"].shape == (4, tp) and batch["prompt_ids"].dtype == np.int32
    assert batch["positions"].shape == (4, 3, tp + n) and batch["positions"].dtype == np.int32
    assert batch["prompt_mask"].dtype == bool and batch["prompt_mask"][:, -1].all()
    assert (batch["prompt_ids"][:, -1] == tok.special("<|vision_start|>")).all()
    assert (batch["uncond_ids"] == tok.special("<|fim_pad|>")).any(axis=1).all()
    assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.float32
    assert -1 <= batch["images"].min() and batch["images"].max() <= 1
    assert it.stats()["data/records_seen"] == 4 and it.stats()["data/records_bad"] == 0


def test_understanding_and_editing_batch_schema():
    config = make_config("understanding")
    side = config.data.vit_image_size // 14  # tiny ViT: patch 14, merge 2
    assert input_pipeline.vit_grid(config) == (1, side, side)
    n_patches, n_vit = side * side, side * side // 4
    batch = next(input_pipeline.make_iterator(config))
    assert batch["pixels"].shape == (4, n_patches, 3 * 2 * 14 * 14) and batch["pixels"].dtype == np.float32
    assert (batch["vit_mask"].sum(1) == n_vit).all()
    assert batch["text_targets"].shape == (4, 96) and (batch["text_targets"] >= 0).any(axis=1).all()
    assert batch["positions"].shape == (4, 3, 96)
    batch = next(input_pipeline.make_iterator(make_config("editing")))
    assert (batch["src_mask"].sum(1) == 64).all() and (batch["vit_mask"].sum(1) == n_vit).all()
    assert batch["src_images"].shape == batch["images"].shape == (4, 32, 32, 3)
    assert batch["positions"].shape == (4, 3, 256 + 64)
    assert not (batch["src_mask"] & batch["vit_mask"]).any()


def test_vision_batch_is_pixels_and_the_captions_words():
    config = make_config("vision")
    batch = next(input_pipeline.make_iterator(config, split="validation"))  # read in order: row i = index i
    side = config.data.vit_image_size // 14
    assert sorted(batch) == ["caption_words", "pixels"]
    assert batch["pixels"].shape == (4, side * side, 3 * 2 * 14 * 14)
    assert batch["caption_words"].shape == (4, config.model.decoder.vocab_size)
    assert batch["caption_words"].dtype == np.float32
    tok = tokenizer_lib.load_tokenizer("builtin")
    for i in range(4):
        caption = shapes.make_example("validation", i, "pair", resolution=config.data.vit_image_size)["caption"]
        assert set(np.flatnonzero(batch["caption_words"][i])) == set(tok.encode(caption)), caption


def scene_labels(objects, grid, cover=False):
    t = input_pipeline.scene_cell_targets(objects, grid, cover=cover)
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
        elif fraction >= input_pipeline.COVER_FRACTION:
            assert (shape[cell], color[cell]) == (1 + shapes.SHAPES.index(s), 1 + list(shapes.COLORS).index(c))
        else:
            assert shape[cell] == color[cell] == 0
    assert (shape > 0).sum() > (centre_shape > 0).sum() == 4


def test_scene_cell_centres_give_each_labelled_cell_its_objects_centre():
    objects = [["circle", "red", 0.2, 0.2, 0.3], ["cross", "white", 0.75, 0.3, 0.28]]
    for cover in (False, True):
        targets = input_pipeline.scene_cell_targets(objects, 4, cover=cover)
        shape, centres = targets["cell_shape"], targets["cell_centre"]
        owner = input_pipeline.scene_cell_objects(objects, 4, cover=cover)
        assert centres.shape == (16, 2) and centres.dtype == np.float32
        np.testing.assert_array_equal(owner >= 0, shape > 0)
        for cell in range(16):
            expected = [objects[owner[cell]][2] * 4, objects[owner[cell]][3] * 4] if owner[cell] >= 0 else [0, 0]
            np.testing.assert_allclose(centres[cell], expected, rtol=1e-6)
        assert sorted(set(owner) - {-1}) == [0, 1]


def test_relation_targets_put_each_relation_on_the_tokens_of_its_second_object():
    from star_jax.shapes import scene as scene_lib

    bit = lambda rel, shape, color: (  # noqa: E731
        scene_lib.RELATIONS.index(rel),
        scene_lib.SHAPES.index(shape),
        list(scene_lib.COLORS).index(color),
    )
    # A red circle left of a blue square, both in the top row of the 4 x 4 grid.
    objects = [["circle", "red", 0.15, 0.15, 0.2], ["square", "blue", 0.85, 0.15, 0.2]]
    relations = lambda objects, cover: input_pipeline.scene_cell_targets(  # noqa: E731
        objects, 4, cover=cover, relations=True
    )["cell_relations"].reshape(16, 4, 5, 10)
    targets = relations(objects, False)
    owner = input_pipeline.scene_cell_objects(objects, 4)
    assert targets.shape == (16, 4, 5, 10) and targets.dtype == np.float32
    on_square, on_circle = targets[owner == 1], targets[owner == 0]
    assert len(on_square) == len(on_circle) == 1 and targets[owner < 0].sum() == 0
    assert on_square[0][bit("left of", "circle", "red")] == 1 and on_square[0].sum() == 1
    assert on_circle[0][bit("right of", "square", "blue")] == 1 and on_circle[0].sum() == 1
    # A green triangle clearly right of the circle and only a little lower: "below" might hold, so
    # that bit is ignored (-1) while "right of" is set.
    objects.append(["triangle", "green", 0.5, 0.4, 0.12])
    on_circle = relations(objects, False)[input_pipeline.scene_cell_objects(objects, 4) == 0][0]
    assert on_circle[bit("below", "triangle", "green")] == -1
    assert on_circle[bit("right of", "triangle", "green")] == 1
    objects.pop()
    # Every position question the world asks as yes / no reads one bit of its second object's tokens.
    checked = 0
    for i in range(300):
        ex = shapes.make_example("train", i, "qa", resolution=32)
        if not (ex["qa_kind"] == "position" and ex["answer"] in ("yes", "no")):
            continue
        objects = [[o.shape, o.color, o.x, o.y, o.size] for o in ex["scene"].objects]
        targets = relations(objects, True)
        owner = input_pipeline.scene_cell_objects(objects, 4, cover=True)
        a_text, rel, b_text = re.fullmatch(
            r"is the (.+) (left of|right of|above|below) the (.+)\?", ex["question"]
        ).groups()
        a_words, b_words = a_text.split(), b_text.split()
        objs = ex["scene"].objects
        a, b = (
            next(k for k, o in enumerate(objs) if o.shape == ws[-1] and (len(ws) == 1 or o.color == ws[0]))
            for ws in (a_words, b_words)
        )
        cells = np.flatnonzero(owner == b)
        for cell in cells:
            value = targets[cell][bit(rel, objs[a].shape, objs[a].color)]
            assert value == (1 if ex["answer"] == "yes" else 0), (ex["question"], objects)
        checked += len(cells) > 0
    assert checked >= 10


@pytest.mark.parametrize("labels", ["scene_cells", "scene_cover"])
def test_vision_batch_on_scene_cells_labels_every_merged_token(labels):
    config = make_config("vision", vision_labels=labels, scene_centres=labels == "scene_cover")
    batch = next(input_pipeline.make_iterator(config, split="validation"))  # row i = index i
    grid = config.data.vit_image_size // (14 * 2)
    centres = ["cell_centre"] if labels == "scene_cover" else []
    assert sorted(batch) == sorted(["cell_color", "cell_shape", "pixels"] + centres)
    assert batch["cell_shape"].shape == batch["cell_color"].shape == (4, grid * grid)
    for i in range(4):
        scene = shapes.make_example("validation", i, "pair", resolution=config.data.vit_image_size)["scene"]
        objects = [[o.shape, o.color, o.x, o.y, o.size] for o in scene.objects]
        targets = input_pipeline.scene_cell_targets(objects, grid, cover=labels == "scene_cover")
        shape, color = targets["cell_shape"], targets["cell_color"]
        np.testing.assert_array_equal(batch["cell_shape"][i], shape)
        np.testing.assert_array_equal(batch["cell_color"][i], color)
        if centres:
            np.testing.assert_array_equal(batch["cell_centre"][i], targets["cell_centre"])
        assert (shape > 0).sum() >= 1 and ((shape > 0).sum() <= len(objects) or labels == "scene_cover")


def test_pair_tags_select_shapes_world_pairs():
    source = input_pipeline.ShapesSource("train", "pairs", 40, resolution=32, pair_tags=("single_object", "colors"))
    for i in range(6):
        tag = ("single_object", "colors")[i % 2]
        expected = shapes.make_example("train", i, "pair", resolution=32, tag=tag)
        assert source[i]["caption"] == expected["caption"] and json.loads(source[i]["metadata"])["tag"] == tag
    from star_jax.configs import validation

    for tags, source_name, message in [(("single",), "shapes", "unknown tags"), (("colors",), "arrayrecord", "shapes")]:
        config = make_config("vision", pair_tags=tags, source=source_name, path="/nonexistent")
        with pytest.raises(validation.ConfigError, match=rf"config.data.pair_tags=.*{message}"):
            validation.validate(config)


def test_caption_fraction_mixes_captioning_turns_into_understanding():
    source = input_pipeline.ShapesSource("train", "qa", 400, resolution=32, caption_fraction=0.25)
    records_ = [source[i] for i in range(400)]
    captions = [i for i, r in enumerate(records_) if r["question"] == input_pipeline.CAPTION_QUESTION]
    assert 70 <= len(captions) <= 130  # 100 expected
    i = captions[0]
    pair = shapes.make_example("train", i, "pair", resolution=32, tag="free_form")
    assert records_[i]["answer"] == pair["caption"]
    np.testing.assert_array_equal(records_[i]["image"], pair["image"])
    j = next(k for k in range(400) if k not in captions)
    assert records_[j]["answer"] == shapes.make_example("train", j, "qa", resolution=32)["answer"]
    # Deterministic per index; 0 keeps the pure QA stream; the batch tokenizes within the limit.
    again = input_pipeline.ShapesSource("train", "qa", 400, resolution=32, caption_fraction=0.25)
    assert [again[k]["question"] for k in captions[:5]] == [records_[k]["question"] for k in captions[:5]]
    plain = input_pipeline.ShapesSource("train", "qa", 400, resolution=32)
    assert all(plain[k]["question"] != input_pipeline.CAPTION_QUESTION for k in range(100))
    batch = next(input_pipeline.make_iterator(make_config("understanding", batch_size=8, caption_fraction=1.0)))
    tok = tokenizer_lib.load_tokenizer("builtin")
    text = tok.decode([t for t in batch["prompt_ids"][0] if t != tok.pad_id])
    assert input_pipeline.CAPTION_QUESTION in text


@pytest.mark.parametrize("value, source, message", [(1.5, "shapes", r"\[0, 1\]"), (0.5, "arrayrecord", "shapes world")])
def test_caption_fraction_is_validated(value, source, message):
    from star_jax.configs import validation

    config = make_config("understanding", caption_fraction=value, source=source, path="/nonexistent")
    with pytest.raises(validation.ConfigError, match=r"config\.data\.caption_fraction=.*" + message):
        validation.validate(config)


@pytest.mark.parametrize(
    "value, source, message",
    [
        ("boxes", "shapes", "not one of"),
        ("scene_cells", "arrayrecord", "shapes world"),
        ("scene_cover", "arrayrecord", "shapes world"),
    ],
)
def test_vision_labels_are_validated(value, source, message):
    from star_jax.configs import validation

    config = make_config("vision", vision_labels=value, source=source, path="/nonexistent")
    with pytest.raises(validation.ConfigError, match=r"config\.data\.vision_labels=.*" + message):
        validation.validate(config)


def test_qa_per_image_asks_follow_up_questions_about_the_same_scene():
    source = input_pipeline.ShapesSource("train", "qa", 40, resolution=32, caption_fraction=0.5, qa_per_image=4)
    checked = 0
    for i in range(40):
        record = source[i]
        turns = [(record["question"], record["answer"]), *records.decode_turns(record["follow_ups"])]
        assert len({q for q, _ in turns}) == len(turns) <= 4  # distinct questions
        scene = shapes.make_example("train", i, "qa", resolution=32)["scene"]
        if record["question"] == input_pipeline.CAPTION_QUESTION:
            scene = shapes.make_example("train", i, "pair", resolution=32, tag="free_form")["scene"]
        else:
            assert record["answer"] == shapes.make_example("train", i, "qa", resolution=32)["answer"]
        for q, a in turns[1:]:  # every follow-up answer holds for this record's scene
            expected = _answer(scene, q)
            assert expected in (a, None), (i, q, a, expected)
            checked += expected is not None
    assert checked >= 60  # of about 120 follow-ups; position questions are not recomputed
    assert sum(len(records.decode_turns(source[i]["follow_ups"])) == 3 for i in range(40)) >= 36
    assert (
        source[7]["follow_ups"]
        == input_pipeline.ShapesSource("train", "qa", 40, resolution=32, caption_fraction=0.5, qa_per_image=4)[7][
            "follow_ups"
        ]
    )
    assert "follow_ups" not in input_pipeline.ShapesSource("train", "qa", 40, resolution=32)[7]
    # The batch holds one target span per turn.
    config = make_config("understanding", batch_size=4, qa_per_image=3, max_prompt_len=128)
    batch = next(input_pipeline.make_iterator(config))
    tok = tokenizer_lib.load_tokenizer("builtin")
    im_end = tok.special("<|im_end|>")
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


@pytest.mark.parametrize(
    "value, source, message",
    [(0, "shapes", "integer >= 1"), (-2, "shapes", "integer >= 1"), (3, "arrayrecord", "shapes world")],
)
def test_qa_per_image_is_validated(value, source, message):
    from star_jax.configs import validation

    config = make_config("understanding", qa_per_image=value, source=source, path="/nonexistent")
    with pytest.raises(validation.ConfigError, match=r"config\.data\.qa_per_image=.*" + message):
        validation.validate(config)


def test_same_seed_same_batches_other_seed_other_order():
    for stage in ("vq", "generation"):
        a = take(input_pipeline.make_iterator(make_config(stage)), 3)
        assert_batches_equal(a, take(input_pipeline.make_iterator(make_config(stage)), 3))
        c = take(input_pipeline.make_iterator(make_config(stage, shuffle_seed=1)), 3)
        key = "images"
        assert not all(np.array_equal(x[key], y[key]) for x, y in zip(a, c))


def test_restore_mid_epoch_gives_the_uninterrupted_batches():
    config = make_config()  # 24 examples, batch 4: restore after 3 batches, continue past the epoch end
    it = input_pipeline.make_iterator(config)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
    expected, stats = take(it, 5), it.stats()
    resumed = input_pipeline.make_iterator(config)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), expected)
    assert resumed.stats() == stats


def image_counts(config, process_index, process_count):
    it = input_pipeline.make_iterator(config, process_index=process_index, process_count=process_count, num_epochs=1)
    return collections.Counter(
        image.tobytes() + ids.tobytes() for batch in it for image, ids in zip(batch["images"], batch["prompt_ids"])
    )


def test_processes_read_disjoint_shards_that_cover_the_data():
    config = make_config(batch_size=4)  # 24 records; 2 processes x local batch 2 x 6 steps
    one = image_counts(config, 0, 1)
    shards = [image_counts(config, p, 2) for p in range(2)]
    assert sum(one.values()) == 24 and [sum(s.values()) for s in shards] == [12, 12]
    assert shards[0] + shards[1] == one  # together exactly the data: disjoint and covering
    assert not set(shards[0]) & set(shards[1])


# ------------------------------------------------------------------------------------------------
# Corrupt-data fixture


def png(array) -> bytes:
    return records.encode_png(np.asarray(array, np.uint8))


def fixture_dataset(tmp_path):
    """A pairs dataset (with codes) whose 'validation' and 'train' splits hold 6 good records and
    13 bad ones of 13 kinds. Returns (dir, expected skips with images, expected skips with codes)."""
    good = []
    for i in range(6):
        ex = shapes.make_example("train", i, "pair", resolution=32)
        codes = np.random.default_rng(i).integers(0, 64, 64).astype(np.int32)
        good.append({"image": png(ex["image"]), "caption": ex["caption"], "metadata": "{}", "codes": codes})
    base = good[0]
    rgb = shapes.make_example("train", 0, "pair", resolution=32)["image"]
    bad = [  # (record or raw bytes, reason when images are read, reason when codes are read)
        (b"\x00\x01 not a record", "corrupt_record", "corrupt_record"),
        ("missing caption", "missing_field", "missing_field"),
        ({**base, "image": b"GIF89a garbage"}, "corrupt_image", None),
        ({**base, "image": base["image"][:50]}, "corrupt_image", None),  # truncated PNG
        ({**base, "image": png(rgb[..., 0])}, "image_channels", None),  # grey
        ({**base, "image": png(np.concatenate([rgb, rgb[..., :1]], -1))}, "image_channels", None),  # RGBA
        ({**base, "image": png(rgb[:8, :8])}, "image_size", None),  # too small
        ({**base, "image": png(np.zeros((20, 100, 3)))}, "image_size", None),  # aspect 5
        ({**base, "caption": "   "}, "empty_text", "empty_text"),
        ({**base, "caption": b"a red \xff\xfe circle"}, "non_utf8_text", "non_utf8_text"),
        ({**base, "caption": "red circle " * 40}, "too_long", "too_long"),
        ({**base, "codes": np.full(64, 64, np.int32)}, None, "bad_codes"),  # id == codebook size
        ({**base, "codes": np.arange(10, dtype=np.int32)}, None, "bad_codes"),  # wrong count
    ]
    directory = records.write_dataset(str(tmp_path), "corrupt", "pairs", {"train": [(0, base)]}, pretokenized=True)
    feats = records.load_features(directory)
    no_caption = tfds.features.FeaturesDict({k: v for k, v in feats.items() if k != "caption"})

    def serialize(item):
        if isinstance(item, bytes):
            return item
        if isinstance(item, str):
            return no_caption.serialize_example({k: v for k, v in base.items() if k != "caption"})
        return feats.serialize_example(item)

    serialized = [serialize(b[0]) for b in bad[:7]] + [serialize(g) for g in good[:3]]
    serialized += [serialize(b[0]) for b in bad[7:]] + [serialize(g) for g in good[3:]]  # last record good
    for split in ("train", "validation"):
        writer = ArrayRecordWriter(f"{directory}/corrupt-{split}.array_record-00000-of-00001", "group_size:1")
        for data in serialized:
            writer.write(data)
        writer.close()
    with_images = collections.Counter(b[1] for b in bad if b[1])
    with_codes = collections.Counter(b[2] for b in bad if b[2])
    return directory, with_images, with_codes


def test_corrupt_records_are_skipped_and_counted(tmp_path, caplog):
    directory, with_images, with_codes = fixture_dataset(tmp_path)
    assert len(with_images | with_codes) >= 8
    for pretokenized, expected in ((False, with_images), (True, with_codes)):
        config = make_config(
            batch_size=1, source="arrayrecord", path=directory, pretokenized=pretokenized, max_bad_fraction=1.0
        )
        it = input_pipeline.make_iterator(config, split="validation", num_epochs=1)
        batches = list(it)
        stats = it.stats()
        assert len(batches) == 19 - sum(expected.values())
        assert {k[len("data/bad/") :]: int(v) for k, v in stats.items() if k.startswith("data/bad/")} == expected
        assert stats["data/records_seen"] == 19 and stats["data/records_bad"] == sum(expected.values())
        key = "codes" if pretokenized else "images"
        assert all(b[key].shape[1:] == ((64,) if pretokenized else (32, 32, 3)) for b in batches)
    assert "skipped record" in caplog.text and "data[generation/validation 0/1]: skipped" in caplog.text


def test_too_many_bad_records_stop_the_run(tmp_path):
    directory, _, _ = fixture_dataset(tmp_path)
    config = make_config(source="arrayrecord", path=directory, max_bad_fraction=0.25, bad_check_after=10)
    with pytest.raises(
        records.BadDataError,
        match=r"of \d+ records are bad \(\d+\.\d+%\), more than config.data.max_bad_fraction=25.00%",
    ):
        take(input_pipeline.make_iterator(config), 5)


def test_restore_with_two_workers_and_bad_records(tmp_path):
    """Two Grain worker processes: bad-record counts cross the process boundary; a restore mid-epoch
    gives the uninterrupted run's next batches and counts."""
    directory, _, _ = fixture_dataset(tmp_path)
    config = make_config(batch_size=2, source="arrayrecord", path=directory, max_bad_fraction=1.0, num_workers=2)
    it = input_pipeline.make_iterator(config)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected, stats = take(it, 4), it.stats()
    it.close()
    assert stats["data/records_bad"] > 0
    resumed = input_pipeline.make_iterator(config)
    resumed.set_state(state)
    got = take(resumed, 4)
    resumed.close()
    assert_batches_equal(got, expected)
    assert resumed.stats() == stats


def test_count_targets_answer_every_count_question_of_the_world():
    # Two red circles and a blue circle: the scene has 3, each circle 3 circles, the red ones 2 red circles.
    objects = [
        ["circle", "red", 0.15, 0.15, 0.2],
        ["circle", "red", 0.85, 0.15, 0.2],
        ["circle", "blue", 0.5, 0.85, 0.2],
    ]
    np.testing.assert_array_equal(input_pipeline.object_counts(objects), [[3, 3, 2], [3, 3, 2], [3, 3, 1], [3, 0, 0]])
    targets = input_pipeline.scene_cell_targets(objects, 4, cover=True, counts=True)["cell_counts"]
    owner = input_pipeline.scene_cell_objects(objects, 4, cover=True)
    assert targets.shape == (16, 3) and targets.dtype == np.int32
    assert (targets[:, 0] == 3).all() and (targets[owner < 0, 1:] == 0).all()
    # Read at any token of a counted object, the targets answer the world's own count questions.
    from star_jax.shapes import captions

    checked = 0
    for i in range(300):
        ex = shapes.make_example("validation", i, "qa", resolution=32)
        if ex["qa_kind"] != "count":
            continue
        objs = [[o.shape, o.color, o.x, o.y, o.size] for o in ex["scene"].objects]
        counts = input_pipeline.object_counts(objs)
        words = ex["question"].split()
        if words[2] == "objects":
            got = counts[-1, 0]
        else:
            color = words[2] if len(words) == 6 else None
            kinds = [k for k, o in enumerate(objs) if captions.make_plural(o[0]) == words[-3]]
            kinds = [k for k in kinds if color is None or objs[k][1] == color]
            got = counts[kinds[0], 1 if color is None else 2] if kinds else 0
        assert captions.NUMBERS[got] == ex["answer"], ex["question"]
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("name", ["scene_centres", "scene_relations", "scene_counts"])
def test_scene_centres_and_relations_need_scene_labels(name):
    from star_jax.configs import validation

    config = make_config("vision", **{name: True})
    with pytest.raises(validation.ConfigError, match=rf"config\.data\.{name}=.*scene labels"):
        validation.validate(config)


def test_count_present_fraction_asks_counts_of_objects_in_the_scene():
    plain = input_pipeline.ShapesSource("train", "qa", 60, resolution=32)
    source = input_pipeline.ShapesSource("train", "qa", 60, resolution=32, count_present_fraction=0.5)
    changed = 0
    for i in range(60):
        ex = shapes.make_example("train", i, "qa", resolution=32)
        record, base = source[i], plain[i]
        np.testing.assert_array_equal(record["image"], base["image"])
        if (record["question"], record["answer"]) == (base["question"], base["answer"]):
            continue
        changed += 1
        words = record["question"].split()  # how many [colour] <shape>s are there?
        assert words[:2] == ["how", "many"] and words[-2:] == ["are", "there?"], record["question"]
        color = words[2] if len(words) == 6 else None
        shape = next(s for s in shapes.SHAPES if shapes.captions.make_plural(s) == words[-3])
        n = sum(o.shape == shape and color in (None, o.color) for o in ex["scene"].objects)
        assert n >= 1 and record["answer"] == shapes.captions.NUMBERS[n], (record, ex["scene"])
    assert 15 <= changed <= 45
    # A pure function of (seed, split, index): another source gives the same questions.
    again = input_pipeline.ShapesSource("train", "qa", 60, resolution=32, count_present_fraction=0.5)
    assert [again[i]["question"] for i in range(60)] == [source[i]["question"] for i in range(60)]


def test_grounding_fraction_asks_where_objects_are():
    plain = input_pipeline.ShapesSource("train", "qa", 60, resolution=32, qa_per_image=3)
    source = input_pipeline.ShapesSource("train", "qa", 60, resolution=32, qa_per_image=3, grounding_fraction=0.4)
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
    again = input_pipeline.ShapesSource("train", "qa", 60, resolution=32, qa_per_image=3, grounding_fraction=0.4)
    assert [again[i]["follow_ups"] for i in range(30)] == [source[i]["follow_ups"] for i in range(30)]
    off = input_pipeline.ShapesSource("train", "qa", 60, resolution=32, qa_per_image=3, grounding_fraction=0.0)
    assert [(off[i]["question"], off[i]["follow_ups"]) for i in range(30)] == [
        (plain[i]["question"], plain[i]["follow_ups"]) for i in range(30)
    ]


def test_position_reasoning_grounds_position_answers_first():
    kw = dict(resolution=32, qa_per_image=3, grounding_fraction=0.25)
    plain = input_pipeline.ShapesSource("train", "qa", 60, **kw)
    source = input_pipeline.ShapesSource("train", "qa", 60, position_reasoning=True, **kw)
    reasoned = 0
    for i in range(60):
        scene = shapes.make_example("train", i, "qa", resolution=32)["scene"]
        record, base = source[i], plain[i]
        assert record["question"] == base["question"]
        turns = [(record["question"], record["answer"])] + json.loads(record["follow_ups"])
        base_turns = [(base["question"], base["answer"])] + json.loads(base["follow_ups"])
        assert [q for q, _ in turns] == [q for q, _ in base_turns]
        for (q, a), (_, plain_a) in zip(turns, base_turns):
            expected = shapes.captions.reason_about_position(scene, q, plain_a)
            assert a == (expected or plain_a), (q, a)
            reasoned += expected is not None
    assert reasoned >= 15, reasoned
    # The pipeline's config passes it to the understanding stream only.
    config = make_config("understanding", position_reasoning=True)
    spec = input_pipeline.ExampleSpec.from_config(config)
    assert input_pipeline.make_source(config, "train", spec)[0].position_reasoning


def test_position_reasoning_is_validated():
    from star_jax.configs import validation

    config = make_config("understanding", position_reasoning=True, source="arrayrecord", path="/nonexistent")
    with pytest.raises(validation.ConfigError, match=r"config\.data\.position_reasoning=True.*shapes world"):
        validation.validate(config)


@pytest.mark.parametrize(
    "value, source, message", [(-0.1, "shapes", r"\[0, 1\]"), (0.2, "arrayrecord", "shapes world")]
)
def test_grounding_fraction_is_validated(value, source, message):
    from star_jax.configs import validation

    config = make_config("understanding", grounding_fraction=value, source=source, path="/nonexistent")
    with pytest.raises(validation.ConfigError, match=r"config\.data\.grounding_fraction=.*" + message):
        validation.validate(config)


def _question_kind(question: str) -> str:
    starts = {"how many": "count", "what color": "color", "what shape": "shape", "is there": "existence"}
    return next((k for p, k in starts.items() if question.startswith(p)), "position")


def test_qa_kind_weights_set_the_training_mixture():
    only = input_pipeline.ShapesSource("train", "qa", 40, resolution=32, qa_kind_weights=(0, 1, 0, 0, 1))
    assert {_question_kind(only[i]["question"]) for i in range(40)} <= {"color", "existence", "count"}
    # (count is the fallback of a scene that admits none of the asked kinds)
    assert sum(_question_kind(only[i]["question"]) in ("color", "existence") for i in range(40)) >= 36
    skewed = input_pipeline.ShapesSource("train", "qa", 200, resolution=32, qa_kind_weights=(6, 1, 1, 1, 1))
    counts = sum(_question_kind(skewed[i]["question"]) == "count" for i in range(200))
    assert counts > 80  # 0.6 expected; the uniform draw gives 0.2
    # Answers hold for the scene (checked for counts), and the record is a pure function of the index.
    for i in range(40):
        record, ex = skewed[i], shapes.make_example("train", i, "qa", resolution=32)
        np.testing.assert_array_equal(record["image"], ex["image"])
        if record["question"] == "how many objects are there?":
            assert record["answer"] == shapes.captions.NUMBERS[len(ex["scene"].objects)]
    again = input_pipeline.ShapesSource("train", "qa", 200, resolution=32, qa_kind_weights=(6, 1, 1, 1, 1))
    assert [again[i]["question"] for i in range(50)] == [skewed[i]["question"] for i in range(50)]


@pytest.mark.parametrize(
    "weights, source, message",
    [
        ((1, 1, 1), "shapes", "needs 5 weights, one per kind"),
        ((0, 0, 0, 0, 0), "shapes", ">= 0 and not all 0"),
        ((1, -1, 1, 1, 1), "shapes", ">= 0 and not all 0"),
        ((1, 1, 1, 1, 1), "arrayrecord", "shapes world"),
    ],
)
def test_qa_kind_weights_are_validated(weights, source, message):
    from star_jax.configs import validation

    config = make_config("understanding", qa_kind_weights=weights, source=source, path="/nonexistent")
    with pytest.raises(validation.ConfigError, match=r"config\.data\.qa_kind_weights=.*" + message):
        validation.validate(config)


@pytest.mark.parametrize("value, source, message", [(1.5, "shapes", r"\[0, 1\]"), (0.5, "arrayrecord", "shapes world")])
def test_count_present_fraction_is_validated(value, source, message):
    from star_jax.configs import validation

    config = make_config("understanding", count_present_fraction=value, source=source, path="/nonexistent")
    with pytest.raises(validation.ConfigError, match=r"config\.data\.count_present_fraction=.*" + message):
        validation.validate(config)
