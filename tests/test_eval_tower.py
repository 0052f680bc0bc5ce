"""The tower probe (`star_jax.eval.tower`): its scoring against the labels' own oracle, and the reader
of relation bits against the world's position answers."""

import numpy as np
import pytest

from star_jax import input_pipeline, shapes
from star_jax.eval import tower
from star_jax.shapes import scene as scene_lib

GRID = 4


def _examples(num=240, split="validation"):
    return [shapes.make_example(split, i, "qa") for i in range(num)]


def _oracle_outputs(examples, *, cover=True, flip=None):
    """The heads' outputs that the labels themselves give; `flip` maps each relation's bits to another's."""
    rel = len(scene_lib.RELATIONS)
    rows = {k: [] for k in ("shape", "color", "centre", "relations", "counts")}
    for ex in examples:
        t = input_pipeline.scene_cell_targets(
            tower.scene_objects(ex["scene"]), GRID, cover=cover, relations=True, counts=True
        )
        rows["counts"].append(np.eye(scene_lib.DEFAULT_WORLD.max_objects + 1)[t["cell_counts"]] * 10)
        rows["shape"].append(np.eye(len(scene_lib.SHAPES) + 1)[t["cell_shape"]] * 10)
        rows["color"].append(np.eye(len(scene_lib.COLORS) + 1)[t["cell_color"]] * 10)
        rows["centre"].append(t["cell_centre"])
        bits = np.where(t["cell_relations"] > 0.5, 5.0, -5.0).reshape(GRID * GRID, rel, -1)
        if flip is not None:
            bits = bits[:, flip]
        rows["relations"].append(bits.reshape(GRID * GRID, -1))
    return {k: np.stack(v).astype(np.float32) for k, v in rows.items()}


def test_oracle_outputs_score_perfectly_and_answer_every_position_question():
    examples = _examples()
    result = tower.score(_oracle_outputs(examples), examples, cover=True)
    assert result["cells"] > len(examples)
    assert result["shape_accuracy"] == 1.0 and result["color_accuracy"] == 1.0 and result["centre_error"] == 0.0
    assert result["relation_recall"] == 1.0 and result["relation_precision"] == 1.0
    pos = result["position"]
    asked = sum(ex["qa_kind"] == "position" for ex in examples)
    assert pos["yes_no"][0] + pos["where"][0] == asked and pos["yes_no"][0] > 10 and pos["where"][0] > 5
    # Every question whose B owns a token is answered right (B owns none only when two centres share a cell).
    right = pos["yes_no"][0] * pos["yes_no"][1] + pos["where"][0] * pos["where"][1]
    assert right == pytest.approx(asked - pos["unanswered"]) and pos["unanswered"] <= 2
    assert result["scene_count_accuracy"] == 1.0 and result["object_count_accuracy"] == 1.0
    # Count questions read at their objects' tokens: right unless an object owns no token.
    assert set(result["count"]) == {
        "how many objects are there?",
        "how many <shapes> are there?",
        "how many <colour> <shapes> are there?",
    }
    assert all(n > 5 and acc >= 0.95 for n, acc in result["count"].values())
    assert "how many <shapes> are there? (" in tower.format_probe(result)


def test_bits_read_from_the_wrong_relation_answer_badly():
    # left <-> right, above <-> below: the reader must pick the asked relation's bits of B's tokens.
    order = [scene_lib.RELATIONS.index(r) for r in ("right of", "left of", "below", "above")]
    examples = _examples()
    good = tower.score(_oracle_outputs(examples), examples, cover=True)["position"]["overall"]
    bad = tower.score(_oracle_outputs(examples, flip=order), examples, cover=True)
    assert bad["relation_recall"] < 0.5 and bad["position"]["overall"] < good - 0.3


def test_question_parts_name_the_objects_the_world_asked_about():
    for ex in _examples(300):
        if ex["qa_kind"] != "position":
            with pytest.raises(ValueError, match="not a shapes-world position question"):
                tower.position_question_parts(ex["scene"], ex["question"])
            continue
        a, rel, b = tower.position_question_parts(ex["scene"], ex["question"])
        objs = ex["scene"].objects
        assert a != b
        if rel is None:  # "where": the one clear relation is the answer
            assert scene_lib.clear_relations(objs[a], objs[b]) == {ex["answer"]}
        else:
            assert (rel in scene_lib.clear_relations(objs[a], objs[b])) == (ex["answer"] == "yes")


def test_scene_cells_labelling_and_no_relations():
    examples = _examples(40)
    outputs = _oracle_outputs(examples, cover=False)
    outputs["relations"], outputs["counts"] = outputs["relations"][..., :0], outputs["counts"][:, :, :0]
    result = tower.score(outputs, examples, cover=False)
    assert "position" not in result and "count" not in result and result["shape_accuracy"] == 1.0
    assert result["cells"] == sum(
        (input_pipeline.scene_cell_objects(tower.scene_objects(e["scene"]), GRID) >= 0).sum() for e in examples
    )
    assert "relation" not in tower.format_probe(result)
    with pytest.raises(ValueError, match="not a square grid"):
        tower.score({k: v[:, :15] for k, v in outputs.items()}, examples, cover=False)
