"""M-RoPE positions equal transformers' `get_rope_index` (transformers 5: `Qwen2_5_VLModel.get_rope_index`)."""

import functools
import types

import hf_fixtures
import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from star_jax.models import positions

IMAGE, VS, VE, PAD = 250, 252, 253, 0


@pytest.fixture(scope="module")
def hf_rope_index():
    """transformers' get_rope_index bound to a config only (no weights are built)."""
    owner = types.SimpleNamespace(config=hf_fixtures.qwen25vl_config())
    owner.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, owner)

    def run(ids, grids, attention_mask=None):
        ids = np.asarray(ids)
        pos, deltas = Qwen2_5_VLModel.get_rope_index(
            owner,
            torch.tensor(ids),
            mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int32)),
            image_grid_thw=None if grids is None else torch.tensor(grids),
            attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
        )
        return pos.numpy(), deltas.numpy()

    return run


def _text(rng, n):
    return list(rng.randint(1, 240, n))


def _image(grid):
    t, h, w = grid
    return [VS] + [IMAGE] * (t * h * w // 4) + [VE]


def _check(hf_rope_index, ids, grids, attention_mask=None):
    ref, deltas = hf_rope_index(ids, grids, attention_mask)
    ours = positions.rope_index(np.asarray(ids), grids, image_token_id=IMAGE, attention_mask=attention_mask)
    assert ours.shape == ref.shape and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)
    # The decode continuation: HF's next position is (number of real tokens) + delta = max + 1.
    n = np.asarray(ids).shape[1] if attention_mask is None else np.asarray(attention_mask).sum(-1, keepdims=True)
    np.testing.assert_array_equal(positions.next_positions(ours, 2)[0], n + deltas + np.arange(2))
    return ours


def test_text_image_text(hf_rope_index):
    rng = np.random.RandomState(0)
    _check(hf_rope_index, [_text(rng, 5) + _image((1, 6, 8)) + _text(rng, 4)], [(1, 6, 8)])


def test_two_images_in_one_sequence(hf_rope_index):
    rng = np.random.RandomState(1)
    grids = [(1, 4, 10), (1, 12, 2)]  # wide then tall
    ids = _text(rng, 3) + _image(grids[0]) + _text(rng, 2) + _image(grids[1]) + _text(rng, 6)
    pos = _check(hf_rope_index, [ids], grids)
    assert (pos[1] != pos[2]).any()  # the image tokens' h and w streams differ


def test_image_first_and_last(hf_rope_index):
    rng = np.random.RandomState(2)
    grids = [(1, 8, 8), (1, 2, 4)]
    ids = [IMAGE] * 16 + _text(rng, 3) + [IMAGE] * 2
    _check(hf_rope_index, [ids], grids)


def test_batch_with_left_padding(hf_rope_index):
    rng = np.random.RandomState(3)
    grids = [(1, 4, 4), (1, 6, 4), (1, 2, 2)]
    row0 = _text(rng, 2) + _image(grids[0]) + _text(rng, 3) + _image(grids[1]) + _text(rng, 1)
    row1 = _text(rng, 4) + _image(grids[2]) + _text(rng, 2)
    row1 = [PAD] * (len(row0) - len(row1)) + row1
    mask = np.array([[1] * len(row0), [0] * (len(row0) - len(row1)) + [1] * len(row1)])
    mask[1, : len(row0) - 13] = 0
    _check(hf_rope_index, [row0, row1], grids, attention_mask=mask)


def test_text_only_is_arange(hf_rope_index):
    rng = np.random.RandomState(4)
    pos = _check(hf_rope_index, [_text(rng, 7)], None)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(7), (3, 1, 7)))


@pytest.mark.parametrize("vit_grid", [(1, 8, 8), (1, 6, 10)])
def test_star_editing_layout(hf_rope_index, vit_grid):
    # STAR_SPEC 4: E[:14] vs VQ(576) ve vs ViT ve "\n" E[14:]; VQ tokens are not image pads.
    rng = np.random.RandomState(5)
    prompt = _text(rng, 30)
    vq = list(rng.randint(1, 240, 576))
    ids = prompt[:14] + [VS] + vq + [VE] + _image(vit_grid) + [7] + prompt[14:]
    ref = _check(hf_rope_index, [ids], [vit_grid])
    ours = positions.editing_positions(len(prompt), vit_grid)
    np.testing.assert_array_equal(ours, ref[:, 0])
    start = 14 + 1 + 576 + 1 + 1
    assert (ours[:, :start] == np.arange(start)).all()  # the VQ block is 1-D
    n_vit = vit_grid[1] * vit_grid[2] // 4
    assert ours[0, start + n_vit] == start + max(vit_grid[1:]) // 2  # text restarts at max + 1


def test_layout_positions_matches_rope_index():
    grids = [(1, 4, 6)]
    ids = np.array([[1, 2, VS] + [IMAGE] * 6 + [VE, 3]])
    layout = positions.layout_positions([("text", 3), ("image", grids[0]), ("text", 2)])
    np.testing.assert_array_equal(layout, positions.rope_index(ids, grids, image_token_id=IMAGE)[:, 0])


def test_errors_name_the_values():
    ids = np.array([[1, IMAGE, IMAGE, 2]])
    with pytest.raises(ValueError, match=r"image 0 has 2 tokens, grid_thw=\(1, 4, 4\) needs 4"):
        positions.rope_index(ids, [(1, 4, 4)], image_token_id=IMAGE)
    with pytest.raises(ValueError, match="only 0 grids"):
        positions.rope_index(ids, None, image_token_id=IMAGE)
    with pytest.raises(ValueError, match="2 grids but input_ids hold 1"):
        positions.rope_index(ids, [(1, 2, 4), (1, 2, 2)], image_token_id=IMAGE)
    with pytest.raises(ValueError, match="spatial_merge_size=2"):
        positions.image_positions(0, (1, 3, 4))
    with pytest.raises(ValueError, match="insert_at=40"):
        positions.editing_positions(30, (1, 4, 4), insert_at=40)
