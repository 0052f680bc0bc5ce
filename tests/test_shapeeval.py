"""ShapeEval: accuracy on ground truth (clean and degraded), rejection of wrong images, GenEval's logic, the CLI."""

import io
import json
import os
import re
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from star_jax import shapes
from star_jax.cli import eval as eval_cli
from star_jax.shapes import scene as scene_lib
from star_jax.shapes.shapeeval import Detection, evaluate_detections

PER_TASK = 200
RESOLUTION = 64


def _noise(image, rng):
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def _blur(image, rng):
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)))


def _jpeg(image, rng):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=50)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def ground_truth():
    """{tag: [(scene, metadata)]}, PER_TASK validation examples per GenEval task."""
    return {
        tag: [
            (ex["scene"], ex["metadata"])
            for ex in (shapes.make_example("validation", i, "pair", tag=tag, resolution=8) for i in range(PER_TASK))
        ]
        for tag in shapes.GENEVAL_TAGS
    }


@pytest.mark.parametrize("degrade", [None, _noise, _blur, _jpeg], ids=["clean", "noise10", "blur0.7", "jpeg50"])
def test_ground_truth_is_judged_correct(ground_truth, degrade):
    rng = np.random.default_rng(0)
    target = 0.995 if degrade is None else 0.97
    for tag, items in ground_truth.items():
        correct = 0
        for scene, meta in items:
            image = shapes.render(scene, RESOLUTION)
            correct += shapes.evaluate_image(degrade(image, rng) if degrade else image, meta)[0]
        assert correct / len(items) >= target, (tag, correct)


def _wrong(scene: shapes.Scene, meta: dict, rng) -> shapes.Scene:
    """A scene that contradicts `meta` the way generators fail at its task."""
    objs = scene.objects
    tag = meta["tag"]
    if tag == "single_object":  # wrong class
        return scene.replace(0, shape=next(s for s in rng.permutation(shapes.SHAPES) if s != objs[0].shape))
    if tag == "two_object":  # a missing object
        return scene.without(int(rng.integers(2)))
    if tag == "counting":  # one too many or one too few
        if rng.random() < 0.5:
            return scene.without(0)
        extra = scene_lib.place(rng, [(objs[0].color, objs[0].shape)], fixed=objs)
        return scene.with_object(extra[0]) if extra else scene.without(0)
    if tag == "colors":  # wrong colour
        return scene.replace(0, color=next(c for c in rng.permutation(list(shapes.COLORS)) if c != objs[0].color))
    if tag == "position":  # mirrored along the relation's axis
        rel = meta["include"][1]["position"][0]
        axis = "x" if rel in ("left of", "right of") else "y"
        for i, o in enumerate(objs):
            scene = scene.replace(i, **{axis: 1 - getattr(o, axis)})
        return scene
    # color_attr: colours swapped between the two objects
    return scene.replace(0, color=objs[1].color).replace(1, color=objs[0].color)


def test_wrong_images_are_rejected(ground_truth):
    rng = np.random.default_rng(1)
    for tag, items in ground_truth.items():
        judged_correct = 0
        for scene, meta in items:
            wrong = _wrong(scene, meta, rng)
            judged_correct += shapes.evaluate_image(_noise(shapes.render(wrong, RESOLUTION), rng), meta)[0]
        assert judged_correct / len(items) <= 0.02, (tag, judged_correct)


@pytest.mark.parametrize("resolution", [128, 384])
def test_detect_at_high_resolution(resolution):
    scene = shapes.Scene(
        (
            shapes.Obj("triangle", "green", 0.25, 0.25, 0.25),
            shapes.Obj("cross", "white", 0.7, 0.3, 0.3),
            shapes.Obj("diamond", "orange", 0.3, 0.75, 0.2),
            shapes.Obj("circle", "pink", 0.75, 0.75, 0.2),
        )
    )
    found = shapes.detect(shapes.render(scene, resolution))
    assert sorted((d.shape, d.color) for d in found) == sorted((o.shape, o.color) for o in scene.objects)
    for d in found:  # fitted boxes match the drawn ones to a pixel
        obj = next(o for o in scene.objects if o.shape == d.shape)
        np.testing.assert_allclose(np.array(d.box) / resolution, obj.box, atol=1.5 / resolution + 0.01)


def _det(shape, color, x, y, score=1.0):
    return Detection(shape, color, (x - 5, y - 5, x + 5, y + 5), score, 100)


def test_geneval_logic():
    red_left = _det("circle", "red", 10, 50, 0.9)
    blue_right = _det("circle", "blue", 80, 50, 0.8)
    square_right = _det("square", "green", 80, 50)
    # include: at least `count`; colours only on the first `count` (highest score) objects
    assert evaluate_detections([red_left, blue_right], {"include": [{"class": "circle", "count": 1, "color": "red"}]})[
        0
    ]
    ok, reason = evaluate_detections(
        [blue_right, red_left], {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    )
    assert not ok and "expected red circle>=1, found 0 red" in reason
    ok, reason = evaluate_detections([red_left], {"include": [{"class": "circle", "count": 2}]})
    assert not ok and reason == "expected circle>=2, found 1"
    # exclude: fewer than `count`
    meta = {"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    assert evaluate_detections([red_left, blue_right], meta)[0]
    assert not evaluate_detections([red_left, blue_right, _det("circle", "red", 50, 10)], meta)[0]
    # position against the first include's objects
    meta = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert evaluate_detections([red_left, square_right], meta)[0]
    meta["include"][1]["position"] = ["right of", 0]
    ok, reason = evaluate_detections([red_left, square_right], meta)
    assert not ok and "expected circle right of target, found left of target" in reason
    ok, reason = evaluate_detections([red_left], meta)
    assert not ok and "no target for circle to be right of" in reason


@pytest.mark.parametrize(
    "image, metadata, message",
    [
        (np.zeros((64, 64, 3), np.float32), {"include": []}, "image: expected dtype uint8"),
        (np.zeros((64, 64), np.uint8), {"include": []}, r"image: expected shape \[H, W, 3\]"),
        (None, {"include": [{"class": "dog", "count": 1}]}, "metadata.include\\[0\\].class: unknown shape 'dog'"),
        (None, {"include": [{"class": "circle", "count": 1, "color": "teal"}]}, "include\\[0\\].color: unknown colour"),
        (None, {"include": [{"class": "circle", "count": 0}]}, "include\\[0\\].count"),
        (None, {"exclude": [{"class": "circle"}]}, "exclude\\[0\\].count"),
        (None, {"include": [{"class": "circle", "count": 1, "position": ["near", 0]}]}, "unknown relation 'near'"),
        (None, {"include": [{"class": "circle", "count": 1, "position": ["above", 0]}]}, "earlier include"),
        (None, [], "metadata: expected a dict"),
    ],
)
def test_bad_input_raises(image, metadata, message):
    image = np.full((64, 64, 3), 128, np.uint8) if image is None else image
    with pytest.raises(ValueError, match=message):
        shapes.evaluate_image(image, metadata)


def test_summary_is_the_mean_of_the_six_tasks():
    rows = [{"tag": t, "correct": i % 2 == 0, "prompt": f"{t}{i}"} for t in shapes.GENEVAL_TAGS for i in range(4)]
    rows[0]["correct"] = False  # single_object: 1 / 4
    rows += [{"tag": "free_form", "correct": False, "prompt": "x"}]
    summary = shapes.summarize(rows)
    assert summary["tasks"]["single_object"] == (0.25, 1, 4)
    assert summary["overall"] == pytest.approx((0.25 + 5 * 0.5) / 6)
    table = shapes.format_table(rows)
    assert "single_object    = 25.00% (1 / 4)" in table and "Overall score (avg. over tasks): 0.45833" in table


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "gt"
    assert eval_cli.main(["star-jax eval", "shapes", "--write_gt", "5", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 30
    results = tmp_path / "results.jsonl"
    assert eval_cli.main(["star-jax eval", "shapes", "--images", str(out), "--results", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "Total images: 30" in printed and "Overall score (avg. over tasks): 1.00000" in printed
    assert "Controls (must be <= 0.05)" in printed and "scattered palette fragments  = 0.00000 (30 images)" in printed
    assert len(results.read_text().splitlines()) == 30

    # GenEval's layout, with one wrong image in a prompt folder of two.
    lines = (out / "metadata.jsonl").read_text().splitlines()
    meta = {k: v for k, v in json.loads(lines[0]).items() if k != "filename"}
    samples = tmp_path / "geneval" / "00000" / "samples"
    os.makedirs(samples)
    (samples.parent / "metadata.jsonl").write_text(json.dumps(meta))
    Image.open(out / json.loads(lines[0])["filename"]).save(samples / "0000.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(samples / "0001.png")
    assert eval_cli.main(["star-jax eval", "shapes", "--images", str(tmp_path / "geneval")]) == 0
    printed = capsys.readouterr().out
    assert "% correct images: 50.00%" in printed and "% correct prompts: 100.00%" in printed

    assert eval_cli.main(["star-jax eval", "shapes", "--images", str(tmp_path / "empty")]) == 2


def test_vq_ceiling_and_codebook_usage_of_known_round_trips():
    from star_jax.eval import shapes_world

    exact = shapes_world.vq_ceiling(lambda images: images, per_task=2)
    assert exact["summary"]["overall"] == 1.0 and exact["psnr"] > 100  # an identity tokenizer is perfect
    grey = shapes_world.vq_ceiling(lambda images: np.full_like(images, 128), per_task=2)
    assert grey["summary"]["overall"] == 0.0 and grey["psnr"] < 30
    # A fake encoder that writes the code 7 * image index on a 2 x 2 grid: 70 images use 70 distinct
    # codes of 1000, uniformly (log2 70 bits), and a cell of plain background also gets its image's code.
    calls = []

    def encode(images):
        calls.append(len(images))
        start = sum(calls[:-1])
        return np.arange(start, start + len(images))[:, None, None] * 7 % 1000 * np.ones((1, 2, 2), int)

    stats = shapes_world.code_statistics(encode, 1000, num=70)
    assert calls == [64, 6] and stats["codebook_usage"] == 0.07
    assert stats["token_entropy_bits"] == pytest.approx(np.log2(70))
    images = np.stack([shapes.make_example("validation", i, "pair")["image"] for i in range(70)])
    quarters = images.reshape(70, 2, 32, 2, 32, 3)
    with_background_cell = (quarters == 128).all(axis=(2, 4, 5)).any(axis=(1, 2))
    assert 0 < stats["background_codes"] == with_background_cell.sum() < 70
    # A tokenizer that codes each 8 x 8 cell by its mean colour alone gives the background one code.
    cell_code = lambda images: images.reshape(len(images), 8, 8, 8, 8, 3).mean(axis=(2, 4)).sum(-1).astype(int)
    assert shapes_world.code_statistics(cell_code, 4096, num=64)["background_codes"] == 1


def test_edit_code_locality_of_local_and_global_tokenizers():
    from star_jax.eval import shapes_world

    # Codes of each 8 x 8 cell from its own pixels: every unchanged cell keeps its code.
    cell_code = lambda images: images.reshape(len(images), 8, 8, 8, 8, 3).sum(axis=(2, 4)) @ np.array([1, 97, 9409])
    local = shapes_world.edit_code_locality(cell_code, num=70)
    assert 0.5 < local["edit_unchanged_cells"] < 1.0 and local["edit_codes_kept"] == 1.0
    # Codes that add a hash of the whole image to each cell: an edit changes the hash, no code survives.
    image_hash = lambda images: np.array([zlib.crc32(x.tobytes()) for x in images])[:, None, None]
    global_code = lambda images: cell_code(images) + image_hash(images)
    moved = shapes_world.edit_code_locality(global_code, num=70)
    assert moved["edit_unchanged_cells"] == local["edit_unchanged_cells"] and moved["edit_codes_kept"] < 0.05


def test_caption_information_by_cell_kind():
    """A stand-in stack whose caption row puts logit a on the true code (a by cell kind) and whose
    CFG row is uniform: the cross-entropies are known in closed form."""
    import types

    import jax
    import jax.numpy as jnp
    import ml_collections

    from star_jax.eval import shapes_world
    from star_jax.text import tokenizer

    k, a_bg, a_obj, a_first = 4, 1.0, 2.0, 5.0
    background = jnp.asarray(np.array(shapes.BACKGROUND, np.float32) / 127.5 - 1.0)

    def encode_to_codes(x):  # [n, 64, 64, 3] in [-1, 1] -> 0 for all-background cells, 1 otherwise
        cells = x.reshape(x.shape[0], 8, 8, 8, 8, 3)
        return (jnp.abs(cells - background).max(axis=(2, 4, 5)) > 1e-3).astype(jnp.int32)

    def image_logits(batch, codes):
        cond = jnp.any(batch["prompt_ids"] != batch["uncond_ids"], axis=1)[:, None]
        first = jnp.arange(codes.shape[1])[None] == jnp.argmax(codes != 0, axis=1)[:, None]
        a = jnp.where(codes == 0, a_bg, jnp.where(first, a_first, a_obj))
        return jax.nn.one_hot(codes, k) * jnp.where(cond, a, 0.0)[..., None]

    model = types.SimpleNamespace(
        vq_cfg=types.SimpleNamespace(image_size=64),
        vq=types.SimpleNamespace(encode_to_codes=encode_to_codes),
        image_logits=image_logits,
    )
    runner = types.SimpleNamespace(
        model=model,
        tok=tokenizer.load_tokenizer(),
        config=ml_collections.ConfigDict({"data": {"max_prompt_len": 48}}),
        num_tokens=64,
    )
    out = shapes_world.caption_information(runner, num=24, batch=8)

    ce = lambda a: np.log(np.exp(a) + k - 1) - a
    images = np.stack([shapes.make_example("validation", i, "pair")["image"] for i in range(24)])
    n_object = int(np.asarray(encode_to_codes(jnp.asarray(images / 127.5 - 1.0, jnp.float32))).sum())
    expected_object = (24 * ce(a_first) + (n_object - 24) * ce(a_obj)) / n_object  # one first cell per image
    for kind, cond in (("background", ce(a_bg)), ("object", expected_object), ("first_object", ce(a_first))):
        assert out[kind]["uncond"] == pytest.approx(np.log(k), rel=1e-5)
        assert out[kind]["cond"] == pytest.approx(cond, rel=1e-5)
        assert out[kind]["gain"] == pytest.approx(np.log(k) - cond, rel=1e-5)


def test_understanding_control_asks_about_another_scenes_image():
    from star_jax.eval import shapes_world

    exs = [shapes.make_example("validation", i, "qa") for i in range(40)]
    answer_of = {e["image"].tobytes(): e["answer"] for e in exs}

    class Oracle:  # reads the answer off the image (a base that sees perfectly)
        def understand(self, images, questions, max_new_tokens):
            return [answer_of[img.tobytes()] for img in images]

    class Blind:  # answers from the question alone (a base that answers from priors)
        def understand(self, images, questions, max_new_tokens):
            return ["yes" if q.startswith("is") else "zero" for q in questions]

    seen = shapes_world.understanding(Oracle(), num=40, batch=16)
    control = shapes_world.understanding(Oracle(), num=40, batch=16, shuffle_images=True)
    expected = np.mean([exs[i]["answer"] == exs[(i + 1) % 40]["answer"] for i in range(40)])
    assert seen["overall"] == 1.0 and control["overall"] == pytest.approx(expected) and expected < 0.5
    blind = [shapes_world.understanding(Blind(), num=40, shuffle_images=s)["overall"] for s in (False, True)]
    assert blind[0] == blind[1]


def test_understanding_scores_the_final_answer_of_a_reasoned_reply():
    from star_jax.eval import shapes_world

    exs = [shapes.make_example("validation", i, "qa") for i in range(40)]
    scene_of = {e["image"].tobytes(): e["scene"] for e in exs}
    answer_of = {e["image"].tobytes(): e["answer"] for e in exs}

    class Reasoner:  # grounds both objects of a position question before answering
        def understand(self, images, questions, max_new_tokens):
            assert max_new_tokens >= 12  # a reasoned position reply's tokens, <|im_end|> aside
            out = []
            for img, q in zip(images, questions):
                a = answer_of[img.tobytes()]
                out.append(shapes.captions.reason_about_position(scene_of[img.tobytes()], q, a) or a)
            return out

    result = shapes_world.understanding(Reasoner(), num=40, batch=16)
    assert result["overall"] == 1.0
    assert any(":" in pred for _, _, pred in result["answers"])  # the whole replies are kept
    n = sum(e["qa_kind"] == "position" for e in exs)
    assert result["reasoning"] == {"replies": n, "points_exact": 1.0, "points_within_one": 1.0}

    class OffByOne(Reasoner):  # the right answer from points one tenth (x of the first) or two off
        def understand(self, images, questions, max_new_tokens):
            replies = super().understand(images, questions, max_new_tokens)
            return [_shift_first_x(r, 1 + i % 2) if ":" in r else r for i, r in enumerate(replies)]

    off = shapes_world.understanding(OffByOne(), num=40, batch=16)
    assert off["overall"] == 1.0 and off["reasoning"]["points_exact"] == 0.0
    assert 0.0 < off["reasoning"]["points_within_one"] < 1.0


def _shift_first_x(reply: str, by: int) -> str:
    return re.sub(r"^\((\d)", lambda m: f"({(int(m.group(1)) + by) % 10}", reply)


# -- clean scenes and controls ---------------------------------------------------------------------


def _scene(*objs):
    return shapes.Scene(tuple(shapes.Obj(*o) for o in objs))


def test_what_is_not_a_clean_scene_fails_every_prompt():
    """Unexplained foreground, fragments, off-palette colours and shapes that fit no template."""
    scene = _scene(("circle", "red", 0.3, 0.3, 0.25), ("square", "blue", 0.7, 0.7, 0.25))
    meta = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]}
    clean = shapes.render(scene, 64)
    assert shapes.evaluate_image(clean, meta) == (True, "")
    specks = clean.copy()  # too small to be objects, too many to ignore: 48 solid pixels
    for y, x in ((5, 50), (10, 56), (50, 6), (56, 20), (40, 40), (20, 50)):
        specks[y : y + 2, x : x + 4] = shapes.COLORS["yellow"]
    ok, reason = shapes.evaluate_image(specks, meta)
    assert not ok and "foreground outside the objects" in reason
    off_palette = clean.copy()
    off_palette[(clean == shapes.COLORS["red"]).all(-1)] = (160, 70, 70)  # between red, brown and pink
    ok, reason = shapes.evaluate_image(off_palette, meta)
    assert not ok and "is no palette colour" in reason
    blob = clean.copy()
    blob[40:60, 4:8] = shapes.COLORS["green"]  # an L: fits no shape
    blob[56:60, 4:24] = shapes.COLORS["green"]
    ok, reason = shapes.evaluate_image(blob, meta)
    assert not ok and "fits no shape" in reason
    small = shapes.render(_scene(("circle", "red", 0.3, 0.3, 0.1), ("square", "blue", 0.7, 0.7, 0.25)), 64)
    ok, reason = shapes.evaluate_image(small, meta)
    assert not ok and "circle of side" in reason
    assert shapes.shapeeval.analyse(clean).clean and len(shapes.shapeeval.analyse(clean).objects) == 2


def _patch_codebook(size: int = 8, codes: int = 1024) -> np.ndarray:
    """A stand-in VQ decoder's codebook: `codes` distinct size x size cells of validation renders,
    object pieces and edges first (what a trained tokenizer's codes draw)."""
    cells = []
    for i in range(200):
        image = shapes.make_example("validation", i, "pair")["image"]
        cells += list(image.reshape(64 // size, size, 64 // size, size, 3).swapaxes(1, 2).reshape(-1, size, size, 3))
    cells = np.unique(np.stack(cells), axis=0)
    plain = (cells == cells[:, :1, :1]).all(axis=(1, 2, 3))
    return np.concatenate([cells[~plain], cells[plain]])[:codes]


def test_controls_score_zero_while_ground_truth_scores_one():
    from star_jax.eval import shapes_world

    _, metas = shapes_world.generation_prompts(per_task=10)
    truth = np.stack(
        [
            shapes.make_example("validation", i, "pair", tag=m["tag"])["image"]
            for i, m in zip(list(range(10)) * 6, metas)
        ]
    )
    assert shapes_world.score(truth, metas)["summary"]["overall"] >= 0.99
    fragments = shapes_world.score(shapes_world.fragment_images(len(metas), 64, seed=3), metas)
    assert fragments["summary"]["overall"] <= shapes_world.CONTROL_LIMIT
    codebook = _patch_codebook()

    def decode(codes):  # [n, 64] -> [n, 64, 64, 3], each code its cell, smoothed like a decoder's output
        cells = codebook[codes].reshape(-1, 8, 8, 8, 8, 3).swapaxes(2, 3).reshape(-1, 64, 64, 3)
        return np.stack([np.asarray(Image.fromarray(c).filter(ImageFilter.GaussianBlur(0.7))) for c in cells])

    codes = shapes_world.random_code_images(decode, len(codebook), 64, len(metas), seed=0)
    assert shapes_world.score(codes, metas)["summary"]["overall"] <= shapes_world.CONTROL_LIMIT


def test_controls_of_an_untrained_tiny_stack():
    """`shapes_world.controls` on a random `tiny` STAR at the shapes size (64 px, 8 x 8 codes): its
    untrained stack is the generation stage's start, and every control stays <= CONTROL_LIMIT."""
    from test_export import random_model

    from star_jax.configs import star as star_config
    from star_jax.decode.runner import StarRunner
    from star_jax.eval import shapes_world

    config = star_config.get_config("size=tiny,stage=generation")
    config.model.vq.update(image_size=64, patch_size=8, ch_mult=(1,), local_encoder=True, local_context=1)
    config.data.max_prompt_len = 40
    model = random_model(config, seed=5)
    runner = StarRunner(model, config)
    fresh = shapes_world.untrained_stack(runner).model
    value = lambda m, path: np.asarray(nnx_get(m, path))
    n = config.model.star.stack_layers
    up = "stacked_ar.layers.mlp.up.kernel"
    np.testing.assert_array_equal(value(fresh, up), value(model, "base.stack.layers.mlp.up.kernel")[-n:])
    assert not np.array_equal(value(fresh, up), value(model, up))  # the trained model is left as it was
    assert not np.array_equal(value(fresh, "image_head.kernel"), value(model, "image_head.kernel"))
    np.testing.assert_array_equal(value(fresh, "vq.quantize.embedding"), value(model, "vq.quantize.embedding"))
    out = shapes_world.controls(runner, per_task=1, cfg=20.0)
    assert set(out) == {"untrained_stack", "random_codes", "fragments"}
    for name, control in out.items():
        assert control["summary"]["images"] == 6, name
        assert control["summary"]["overall"] <= shapes_world.CONTROL_LIMIT, (name, control["table"])
    vq_only = shapes_world.vq_controls(model.vq, per_task=1)
    assert vq_only["random_codes"]["summary"]["overall"] <= shapes_world.CONTROL_LIMIT


def nnx_get(module, path: str):
    """The value of the variable at dotted `path` under `module`."""
    for name in path.split("."):
        module = getattr(module, name)
    return module[...]
