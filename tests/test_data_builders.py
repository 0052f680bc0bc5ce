"""data/: the shapes-world tfds builder, the converter of user data, VQ pre-tokenisation."""

import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from star_jax import records
from star_jax.configs import star as star_config
from star_jax.input import pipeline as input_pipeline

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def load(name):
    """A script of data/ as a module (data/ is not a package); loaded once per session."""
    key = f"star_jax_data_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(DATA_DIR, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def config(stage="generation", **data):
    c = star_config.get_config(f"size=tiny,stage={stage},runlocal")
    c.train.batch_size = 2
    c.data.max_prompt_len = 256 if stage == "editing" else 48
    for k, v in data.items():
        c.data[k] = v
    return c


def examples(c, split, n):
    """The examples of one epoch (batch 2), in order, as bytes."""
    it = input_pipeline.make_iterator(c, split=split, num_epochs=1)
    keys = [
        b"".join(batch[k][i].tobytes() for k in sorted(batch)) for batch in it for i in range(len(batch["prompt_ids"]))
    ]
    assert len(keys) == n
    return keys


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    shapes_world = load("shapes_world")
    return shapes_world.build(
        str(tmp_path_factory.mktemp("tfds")), "pairs", num_train=8, num_validation=4, num_heldout=2, resolution=32
    )


def test_shapes_world_builder_equals_the_procedural_source(pairs_dir):
    assert records.list_splits(pairs_dir) == ["heldout", "train", "validation"]
    assert os.path.basename(os.path.dirname(pairs_dir)).startswith("pairs")
    meta = json.load(open(os.path.join(pairs_dir, "dataset_info.json")))
    assert {s["name"]: int(s["shardLengths"][0]) for s in meta["splits"]} == {"train": 8, "validation": 4, "heldout": 2}
    for split, n in (("train", 8), ("validation", 4)):  # record i is make_example(split, i): same batches
        procedural = examples(config(num_train_examples=8, num_eval_examples=4), split, n)
        stored = examples(config(source="arrayrecord", path=os.path.dirname(os.path.dirname(pairs_dir))), split, n)
        assert procedural == stored


def test_shapes_world_qa_and_edits_configs(tmp_path):
    shapes_world = load("shapes_world")
    for kind, stage, fields in (("qa", "understanding", {"question", "answer"}), ("edits", "editing", {"instruction"})):
        directory = shapes_world.build(str(tmp_path), kind, num_train=2, num_validation=0, num_heldout=2, resolution=32)
        assert records.list_splits(directory) == ["heldout", "train"]
        record = records.RecordParser(directory)(records.ArrayRecordSource(directory, "heldout")[0])
        assert fields <= set(record)
        batch = next(input_pipeline.make_iterator(config(stage, source="arrayrecord", path=directory), num_epochs=1))
        assert batch["pixels"].shape[0] == 2


def png_file(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_convert_pairs_counts_bad_lines(tmp_path):
    convert = load("convert")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        png_file(images / f"{i}.png", rng.integers(0, 255, (40, 48, 3)))
    png_file(images / "grey.png", rng.integers(0, 255, (40, 48)))  # converted to RGB, kept
    png_file(images / "tiny.png", rng.integers(0, 255, (4, 4, 3)))
    (images / "garbage.png").write_bytes(b"\x89PNG not really")
    line = lambda image, caption: json.dumps({"image": image, "caption": caption}).encode()
    lines = [line(f"{i}.png", f"caption {i}") for i in range(6)] + [
        line("grey.png", "a grey one"),
        line("tiny.png", "too small"),
        line("garbage.png", "unreadable"),
        line("missing.png", "no such file"),
        b'{"image": "1.png", "caption": "caf\xe9"}',  # Latin-1 byte in a UTF-8 file
        b'{"image": "1.png", caption}',
        line("2.png", "   "),
        json.dumps({"image": "2.png"}).encode(),
    ]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n\n")
    directory, report = convert.convert(
        "pairs", str(images), str(jsonl), str(tmp_path / "out"), "mine", validation_fraction=0.3, max_bad_fraction=0.9
    )
    expected = {
        "image_size": 1,
        "corrupt_image": 1,
        "missing_file": 1,
        "non_utf8_text": 1,
        "bad_json": 1,
        "empty_text": 1,
        "missing_field": 1,
    }
    assert report["bad_by_reason"] == expected and report["good"] == 7
    assert json.load(open(os.path.join(directory, "conversion_report.json")))["bad"] == 7
    parse = records.RecordParser(directory)
    captions = [
        parse(src[i])["caption"].decode()
        for split in ("train", "validation")
        for src in [records.ArrayRecordSource(directory, split)]
        for i in range(len(src))
    ]
    assert sorted(captions) == sorted([f"caption {i}" for i in range(6)] + ["a grey one"])
    with pytest.raises(records.BadDataError, match="7 of 14 lines are bad"):
        convert.convert("pairs", str(images), str(jsonl), str(tmp_path / "out2"), "mine", max_bad_fraction=0.1)


def test_convert_stores_images_as_the_image_loader_reads_them(tmp_path):
    """Plain RGB PNG / JPEG bytes are kept; 16-bit, transparent and EXIF-rotated images are stored
    as the RGB PNG that images.load_image gives (alpha over --background); limits count as image_size."""
    convert = load("convert")
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    Image.fromarray(rgb).save(tmp_path / "plain.jpg", quality=90)
    rgba = np.concatenate([rgb, np.full((40, 48, 1), 255, np.uint8)], -1)
    rgba[:, :24, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(np.full((40, 48), 32768, np.uint16)).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", quality=90, exif=exif.tobytes())
    Image.fromarray(np.zeros((40, 400, 3), np.uint8)).save(tmp_path / "wide.png")  # 400 > max_size
    names = ["plain.png", "plain.jpg", "alpha.png", "deep.png", "phone.jpg", "wide.png"]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": n, "caption": n}) for n in names))
    directory, report = convert.convert(
        "pairs",
        str(tmp_path),
        str(jsonl),
        str(tmp_path / "out"),
        "mine",
        validation_fraction=0,
        max_bad_fraction=0.5,
        max_aspect=20.0,
        max_size=300,
        background=(128, 128, 128),
    )
    assert report["good"] == 5 and report["bad_by_reason"] == {"image_size": 1}
    assert "wide.png" in report["first_errors"][0] and "maximum side of 300 pixels" in report["first_errors"][0]
    source, parse = records.ArrayRecordSource(directory, "train"), records.RecordParser(directory)
    stored = {r["caption"].decode(): r["image"] for r in (parse(source[i]) for i in range(len(source)))}
    for name in ("plain.png", "plain.jpg"):
        assert stored[name] == (tmp_path / name).read_bytes()
    alpha = records.decode_image(stored["alpha.png"], "image")
    assert (alpha[:, :24] == 128).all() and np.array_equal(alpha[:, 24:], rgb[:, 24:])
    assert (records.decode_image(stored["deep.png"], "image") == 128).all()
    phone = records.decode_image(stored["phone.jpg"], "image")
    assert phone.shape == (48, 40, 3) and Image.open(io.BytesIO(stored["phone.jpg"])).format == "PNG"


def test_convert_edits_feeds_the_editing_pipeline(tmp_path):
    convert = load("convert")
    rng = np.random.default_rng(1)
    for i in range(4):
        png_file(tmp_path / f"{i}.png", rng.integers(0, 255, (48, 40, 3)))
    jsonl = tmp_path / "edits.jsonl"
    rows = [
        {"source": f"{i}.png", "instruction": "make the red circle blue", "target": f"{(i + 1) % 4}.png"}
        for i in range(4)
    ]
    rows.append({"source": "0.png", "instruction": "x", "target": "gone.png"})
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    directory, report = convert.convert(
        "edits",
        str(tmp_path),
        str(jsonl),
        str(tmp_path / "out"),
        "my_edits",
        validation_fraction=0,
        max_bad_fraction=0.5,
    )
    assert report["good"] == 4 and report["bad_by_reason"] == {"missing_file": 1}
    batch = next(input_pipeline.make_iterator(config("editing", source="arrayrecord", path=directory), num_epochs=1))
    assert batch["src_images"].shape == batch["images"].shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_pretokenize_vq_codes_equal_the_on_the_fly_codes(pairs_dir, tmp_path):
    pretokenize_vq = load("pretokenize_vq")
    c = config(source="arrayrecord", path=pairs_dir)
    encode = pretokenize_vq.build_encoder(c, "random")
    out, report = pretokenize_vq.pretokenize(
        c, pairs_dir, str(tmp_path), "pairs_vq", encode, splits=["validation"], batch_size=3
    )
    assert report == {"written": 4, "skipped": {}}
    on_the_fly = input_pipeline.make_iterator(c, split="validation", num_epochs=1)
    pre = input_pipeline.make_iterator(
        config(source="arrayrecord", path=out, pretokenized=True), split="validation", num_epochs=1
    )
    for a, b in zip(on_the_fly, pre, strict=True):  # validation is read in file order in both
        np.testing.assert_array_equal(encode(a["images"]), b["codes"])
        np.testing.assert_array_equal(a["prompt_ids"], b["prompt_ids"])
        assert b["codes"].dtype == np.int32 and b["codes"].shape == (2, 64)
