"""star_jax.records: validation reasons, image preparation, dataset layout round trip."""

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from star_jax import records


def png(array, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def float_tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("F", (20, 20), 0.5).save(buf, format="TIFF")
    return buf.getvalue()


RGB = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


def test_decode_image_accepts_rgb_bytes_and_arrays():
    np.testing.assert_array_equal(records.decode_image(png(RGB), "image"), RGB)
    np.testing.assert_array_equal(records.decode_image(RGB, "image"), RGB)
    np.testing.assert_array_equal(records.decode_image(np.array(png(RGB), dtype=object), "image"), RGB)


def test_decode_image_converts_non_rgb_bytes_with_the_image_loader():
    """Grey, RGBA and 16-bit records are read by images.load_image, not refused nor clipped."""
    np.testing.assert_array_equal(records.decode_image(png(RGB[..., 0]), "image"), RGB[..., :1].repeat(3, -1))
    rgba = np.concatenate([RGB, np.full((24, 32, 1), 255, np.uint8)], -1)
    rgba[:, :8, 3] = 0
    out = records.decode_image(png(rgba), "image")
    assert (out[:, :8] == 255).all()  # transparent -> white
    np.testing.assert_array_equal(out[:, 8:], RGB[:, 8:])
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 32), 32768, np.uint16)).save(buf, format="PNG")
    assert (records.decode_image(buf.getvalue(), "image") == 128).all()


def test_shapes_world_renders_decode_exactly_as_before():
    """The demo's records: PNG renders of the shapes world decode to the rendered arrays, bit for bit,
    as PIL's plain decoding gives them."""
    from star_jax import shapes

    for i in range(6):
        for kind, keys in (("pair", ["image"]), ("edit", ["source_image", "target_image"])):
            example = shapes.make_example("train", i, kind, resolution=(32, 64)[i % 2])
            for key in keys:
                data = records.encode_png(example[key])
                out = records.decode_image(data, key)
                np.testing.assert_array_equal(out, example[key])
                np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"not an image", "corrupt_image"),
        (png(RGB)[:60], "corrupt_image"),  # truncated PNG
        (b"", "corrupt_image"),
        (RGB[..., :2], "image_channels"),  # array with 2 channels
        (RGB.astype(np.float32), "image_channels"),
        (float_tiff(), "image_channels"),  # 32-bit float pixels: no defined 8-bit range
        (png(RGB[:4, :4]), "image_size"),
        (RGB[:4, :4], "image_size"),
        (png(np.zeros((16, 96, 3))), "image_size"),  # aspect 6 > 4
        (np.zeros((16, 96, 3), np.uint8), "image_size"),
    ],
)
def test_decode_image_rejects(value, reason):
    with pytest.raises(records.BadRecord) as e:
        records.decode_image(value, "source_image")
    assert e.value.reason == reason
    assert "source_image" in str(e.value) and "\n" not in str(e.value)


def test_decode_image_counts_bombs_as_image_size(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(records.BadRecord, match="image_size: image: .*exceeds limit of"):
        records.decode_image(png(RGB), "image")


def test_decode_text():
    assert records.decode_text(b" a red circle \n", "caption") == "a red circle"
    assert records.decode_text(np.array("ok", dtype=object), "caption") == "ok"
    for value, reason in [(b"\xff\xfebad", "non_utf8_text"), (b"   ", "empty_text"), ("", "empty_text"), (3, "other")]:
        with pytest.raises(records.BadRecord) as e:
            records.decode_text(value, "caption")
        assert e.value.reason == reason and "caption" in str(e.value)


def test_decode_turns():
    assert records.decode_turns(b'[["is there a cross?","no"]]') == (("is there a cross?", "no"),)
    assert records.decode_turns("[]") == ()
    for value in [b"[[", b'[["q"]]', b'[["q", ""]]', b'{"q": "a"}', b'[["q", 3]]']:
        with pytest.raises(records.BadRecord) as e:
            records.decode_turns(value)
        assert e.value.reason == "corrupt_record" and "follow_ups" in str(e.value)


def test_decode_objects():
    assert records.decode_objects(b'[["circle","red",0.25,0.5,0.2]]') == [("circle", "red", 0.25, 0.5, 0.2)]
    for value in [b"[[", b'[["circle","red",0.2]]', b'[["circle","red",1.5,0.5,0.2]]', b'[[1,"red",0.2,0.5,0.2]]']:
        with pytest.raises(records.BadRecord) as e:
            records.decode_objects(value)
        assert e.value.reason == "corrupt_record" and "objects" in str(e.value)


def test_check_codes():
    codes = records.check_codes(np.arange(16).reshape(4, 4), "codes", num_codes=16, codebook_size=16)
    assert codes.dtype == np.int32 and codes.shape == (16,)
    for value in [np.arange(15), np.arange(1, 17), np.full(16, -1), np.zeros(16, np.float32)]:
        with pytest.raises(records.BadRecord, match="bad_codes: codes"):
            records.check_codes(value, "codes", num_codes=16, codebook_size=16)


def test_field_missing_and_none():
    assert records.field({"a": 1}, "a") == 1
    for record in [{"a": 1}, {"a": 1, "caption": None}]:
        with pytest.raises(records.BadRecord, match="missing_field: 'caption' not in record"):
            records.field(record, "caption")


def test_write_read_round_trip_and_corrupt_bytes(tmp_path):
    examples = [(i, {"image": png(RGB), "caption": f"caption {i}", "metadata": "{}"}) for i in range(5)]
    directory = records.write_dataset(str(tmp_path), "toy", "pairs", {"train": examples, "validation": examples[:2]})
    assert records.resolve_dataset_dir(str(tmp_path), "pairs") == directory
    source, parse = records.ArrayRecordSource(directory, "train"), records.RecordParser(directory)
    assert len(source) == 5 and len(records.ArrayRecordSource(directory, "validation")) == 2
    captions = sorted(parse(source[i])["caption"].decode() for i in range(5))
    assert captions == [f"caption {i}" for i in range(5)]
    np.testing.assert_array_equal(records.decode_image(parse(source[0])["image"], "image"), RGB)
    with pytest.raises(records.BadRecord, match="corrupt_record"):
        parse(b"\x00\x01garbage")
    with pytest.raises(FileNotFoundError, match=r"no split 'heldout'; splits present: \['train', 'validation'\]"):
        records.ArrayRecordSource(directory, "heldout")
    with pytest.raises(FileNotFoundError, match="no dataset under"):
        records.resolve_dataset_dir(str(tmp_path / "missing"))


def test_concurrent_first_parses_load_the_features_one_at_a_time(tmp_path, monkeypatch):
    """Grain's prefetch threads parse at once in a fresh worker, each loading the features (and with
    them importing tfds) on its first record: two importing tfds together deadlocked a worker."""
    import tensorflow_datasets as tfds

    examples = [(i, {"image": png(RGB), "caption": f"caption {i}", "metadata": "{}"}) for i in range(2)]
    directory = records.write_dataset(str(tmp_path), "toy", "pairs", {"train": examples})
    real, active, most = tfds.features.FeatureConnector.from_config, [0], [0]

    def slow_from_config(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.1)  # a wide window: without the lock every thread would be inside it
        active[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tfds.features.FeatureConnector, "from_config", slow_from_config)
    parse, data = records.RecordParser(directory), records.ArrayRecordSource(directory, "train")[1]
    with ThreadPoolExecutor(8) as pool:
        captions = list(pool.map(lambda _: parse(data)["caption"].decode(), range(8)))
    assert most[0] == 1
    assert captions == ["caption 1"] * 8
