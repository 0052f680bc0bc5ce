"""star_jax.input (pipeline, examples, bad_records): batch schema per stage, determinism, mid-epoch
restore (0 and 2 worker processes), disjoint process shards, a stage driven by its registry record,
and a corrupt-data fixture with 13 kinds of bad record."""

import collections
import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from star_jax import records, shapes, stages
from star_jax.configs import star as star_config
from star_jax.input import examples, pipeline, sources
from star_jax.text import tokenizer as tokenizer_lib

PROMPT_LEN = {"generation": 48, "vq": 48, "understanding": 96, "editing": 256}


def make_config(stage="generation", batch_size=4, **data):
    config = star_config.get_config(f"size=tiny,stage={stage},runlocal")
    config.train.batch_size = batch_size
    config.data.num_train_examples = 24
    config.data.num_eval_examples = 8
    config.data.max_prompt_len = PROMPT_LEN.get(stage, 48)
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
    it = pipeline.make_iterator(config)
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
    assert examples.vit_grid(config) == (1, side, side)
    n_patches, n_vit = side * side, side * side // 4
    batch = next(pipeline.make_iterator(config))
    assert sorted(batch) == ["pixels", "positions", "prompt_ids", "prompt_mask", "text_targets", "vit_mask"]
    assert batch["pixels"].shape == (4, n_patches, 3 * 2 * 14 * 14) and batch["pixels"].dtype == np.float32
    assert (batch["vit_mask"].sum(1) == n_vit).all()
    assert batch["text_targets"].shape == (4, 96) and (batch["text_targets"] >= 0).any(axis=1).all()
    assert batch["positions"].shape == (4, 3, 96)
    batch = next(pipeline.make_iterator(make_config("editing")))
    assert (batch["src_mask"].sum(1) == 64).all() and (batch["vit_mask"].sum(1) == n_vit).all()
    assert batch["src_images"].shape == batch["images"].shape == (4, 32, 32, 3)
    assert batch["positions"].shape == (4, 3, 256 + 64)
    assert not (batch["src_mask"] & batch["vit_mask"]).any()
    with pytest.raises(ValueError, match="config.data.vit_image_size=60 must be a multiple of patch \\* merge = 28"):
        pipeline.make_iterator(make_config("understanding", vit_image_size=60))


def test_vq_batch_is_flipped_images_of_the_vq_size():
    config = make_config("vq", batch_size=8)
    batch = next(pipeline.make_iterator(config, split="validation"))  # read in order: row i = index i
    assert sorted(batch) == ["images"] and batch["images"].shape == (8, 32, 32, 3)
    flipped = 0
    for i, image in enumerate(batch["images"]):
        raw = shapes.make_example("validation", i, "pair", resolution=32)["image"]
        expected = raw.astype(np.float32) * (2 / 255) - 1
        flipped += np.array_equal(image, expected[:, ::-1]) and not np.array_equal(image, expected)
        assert np.array_equal(image, expected) or np.array_equal(image, expected[:, ::-1])
    assert 1 <= flipped <= 7  # the VQ stage's augment flips about half


RENDER_SIZES = []


def _numbers_source(config, split, stage, render_size):
    RENDER_SIZES.append(render_size)
    return [{"value": np.int32(i)} for i in range(10)], None


def _number_example(prepare, record):
    return {"value": np.int32(2 * record["value"])}


def _negate(example, rng):
    return {**example, "value": -example["value"]} if rng.random() < 0.5 else example


NUMBERS_STAGE = stages.Stage(
    name="test_numbers",
    reads="pairs",
    example=_number_example,
    components=(),
    trainable=(),
    objective=None,
    uses_vit=True,
    augment=_negate,
)


def test_a_registered_stage_and_source_drive_the_pipeline():
    """The pipeline knows no stage: a stage's record names its builder and random op, and a project's
    source (config.data.source) yields its records at the stage's render size."""
    sources.register_source("test_numbers", _numbers_source)
    stages.register(NUMBERS_STAGE)
    config = make_config(batch_size=5, source="test_numbers")
    config.stage = "test_numbers"
    RENDER_SIZES.clear()
    values = np.concatenate([b["value"] for b in pipeline.make_iterator(config, split="validation", num_epochs=1)])
    assert RENDER_SIZES == [config.data.vit_image_size]  # uses_vit, no vq_images
    np.testing.assert_array_equal(np.abs(values), [2 * i for i in range(10)])  # built in order (validation)
    assert 0 < (values < 0).sum() < 9  # the stage's random op negated some
    again = np.concatenate([b["value"] for b in pipeline.make_iterator(config, split="validation", num_epochs=1)])
    np.testing.assert_array_equal(values, again)  # and is seeded


def test_vq_image_is_the_centre_square_in_unit_range():
    config = make_config("vq")
    prepare = examples.Prepare([], None, examples.ExampleSpec.from_config(config, stages.get("vq")))
    image = np.zeros((40, 64, 3), np.uint8)
    image[:, 12:52] = 255  # the centre square is white
    out = prepare.vq_image(image)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.ones((32, 32, 3), np.float32))


def test_same_seed_same_batches_other_seed_other_order():
    for stage in ("vq", "generation"):
        a = take(pipeline.make_iterator(make_config(stage)), 3)
        assert_batches_equal(a, take(pipeline.make_iterator(make_config(stage)), 3))
        c = take(pipeline.make_iterator(make_config(stage, shuffle_seed=1)), 3)
        key = "images"
        assert not all(np.array_equal(x[key], y[key]) for x, y in zip(a, c))


def test_restore_mid_epoch_gives_the_uninterrupted_batches():
    config = make_config()  # 24 examples, batch 4: restore after 3 batches, continue past the epoch end
    it = pipeline.make_iterator(config)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
    expected, stats = take(it, 5), it.stats()
    resumed = pipeline.make_iterator(config)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), expected)
    assert resumed.stats() == stats


def image_counts(config, process_index, process_count):
    it = pipeline.make_iterator(config, process_index=process_index, process_count=process_count, num_epochs=1)
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
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by process_count=3"):
        pipeline.make_iterator(config, process_index=0, process_count=3)


# ------------------------------------------------------------------------------------------------
# Corrupt-data fixture


def test_two_processes_together_read_the_one_process_batches():
    """Shuffle first, then deal: the local batches of step k of 2 processes hold exactly the rows
    of the one-process batch k (so a run's data does not depend on its host count)."""
    config = make_config(batch_size=8)
    rows = lambda batch: sorted(map(bytes, np.asarray(batch["prompt_ids"])))  # noqa: E731
    whole = take(pipeline.make_iterator(config), 3)
    parts = [take(pipeline.make_iterator(config, process_index=i, process_count=2), 3) for i in range(2)]
    for k in range(3):
        assert rows(whole[k]) == sorted(rows(parts[0][k]) + rows(parts[1][k]))
        assert len(parts[0][k]["prompt_ids"]) == 4


def png(array) -> bytes:
    return records.encode_png(np.asarray(array, np.uint8))


def float_tiff(array) -> bytes:
    """A 32-bit float TIFF: an image with no defined 8-bit range, which the loader refuses (grey,
    RGBA and 16-bit images are converted, see tests/test_images.py)."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(array, np.float32), mode="F").save(out, format="TIFF")
    return out.getvalue()


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
        ({**base, "image": float_tiff(rgb[..., 0])}, "image_channels", None),  # float pixels: no 8-bit range
        ({**base, "image": float_tiff(rgb[..., 1])}, "image_channels", None),
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
        it = pipeline.make_iterator(config, split="validation", num_epochs=1)
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
        take(pipeline.make_iterator(config), 5)


@pytest.mark.slow
def test_restore_with_two_workers_and_bad_records(tmp_path):
    """Two Grain worker processes: bad-record counts cross the process boundary; a restore mid-epoch
    gives the uninterrupted run's next batches and counts."""
    directory, _, _ = fixture_dataset(tmp_path)
    config = make_config(batch_size=2, source="arrayrecord", path=directory, max_bad_fraction=1.0, num_workers=2)
    it = pipeline.make_iterator(config)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected, stats = take(it, 4), it.stats()
    it.close()
    assert stats["data/records_bad"] > 0
    resumed = pipeline.make_iterator(config)
    resumed.set_state(state)
    got = take(resumed, 4)
    resumed.close()
    assert_batches_equal(got, expected)
    assert resumed.stats() == stats
