"""Qwen2.5-VL parity with transformers (tiny random model, fp32): tower, full-model logits, HF import."""

import json
import os
import shutil

import hf_fixtures
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from star_jax.convert import hf, hf_config, tensor_io
from star_jax.convert.table import CheckpointError

IMAGE, VS, VE = 250, 252, 253


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen25vl"))
    torch_model = hf_fixtures.save_qwen25vl(path)
    return path, torch_model, hf.load_hf_vlm(path)


def _pixels(grid, seed=0):
    n = int(np.prod(np.asarray(grid), axis=-1).sum())
    return np.random.RandomState(seed).randn(n, 3 * 2 * 14 * 14).astype(np.float32)


def _prompt(rng, grids, text_lens):
    """Text runs (len text_lens[i]) around images (vs, image pads, ve); ids avoid the special range."""
    ids = list(rng.randint(0, 240, text_lens[0]))
    for (t, h, w), n in zip(grids, text_lens[1:]):
        ids += [VS] + [IMAGE] * (t * h * w // 4) + [VE] + list(rng.randint(0, 240, n))
    return ids


# window 56 px = 2 x 2 merged patches. Mixed grids (partial windows, several images, t = 2) attend
# over one masked block; equal frames attend per frame (`vision._uniform_frame_length`).
@pytest.mark.parametrize(
    "grid",
    [[[1, 10, 14], [1, 4, 6], [2, 6, 4]], [[1, 10, 14], [1, 10, 14]], [[1, 8, 8]] * 3, [[2, 6, 4]]],
    ids=["mixed", "equal-partial-windows", "equal", "video"],
)
def test_tower_matches_transformers(saved, grid):
    _, torch_model, model = saved
    grid = np.array(grid)
    pixels = _pixels(grid)
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    out = np.asarray(model.tower(jnp.asarray(pixels), grid))
    assert out.shape == ref.shape == (grid.prod(-1).sum() // 4, 64)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_full_model_logits_match_transformers(saved):
    _, torch_model, model = saved
    rng = np.random.RandomState(3)
    grids = [(1, 6, 8), (1, 4, 4), (1, 8, 6)]
    row0 = _prompt(rng, grids[:2], [5, 3, 4])  # two images in one sequence
    row1 = _prompt(rng, grids[2:], [4, 0])
    row1 += list(rng.randint(0, 240, len(row0) - len(row1)))
    ids = np.array([row0, row1])
    grid = np.array(grids)
    pixels = _pixels(grid, seed=1)
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pixels),
            image_grid_thw=torch.tensor(grid),
            mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int32)),
        ).logits.numpy()
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), grid))
    assert logits.shape == ref.shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_v5_in_memory_names_load_the_same(saved, tmp_path):
    path, torch_model, model = saved
    # transformers >= 5 module names: model.visual.*, model.language_model.*
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in tensors)
    dst = str(tmp_path / "v5")
    os.makedirs(dst)
    shutil.copy(os.path.join(path, "config.json"), dst)
    tensor_io.save_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    grid = np.array([[1, 4, 6]])
    pixels = jnp.asarray(_pixels(grid))
    tower = hf.load_hf_vision(dst)
    np.testing.assert_array_equal(np.asarray(tower(pixels, grid)), np.asarray(model.tower(pixels, grid)))
    again = hf.load_hf_vlm(dst)
    ids = jnp.asarray([[1, 2, VS] + [IMAGE] * 6 + [VE, 3]])
    np.testing.assert_array_equal(np.asarray(again(ids, pixels, grid)), np.asarray(model(ids, pixels, grid)))


def test_weight_errors_listed_together(saved, tmp_path):
    dst = str(tmp_path / "bad")
    shutil.copytree(saved[0], dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensor_io.SafetensorsFile(file).items()}
    del tensors["visual.blocks.1.mlp.up_proj.bias"]
    tensors["visual.patch_embed.proj.weight"] = np.zeros((32, 3, 2, 7, 7), np.float32)
    tensors["visual.extra.weight"] = np.zeros(3, np.float32)
    tensor_io.save_safetensors(file, tensors)
    for load in (hf.load_hf_vision, hf.load_hf_vlm):
        with pytest.raises(CheckpointError) as e:
            load(dst)
        msg = str(e.value)
        assert "missing (1): visual.blocks.1.mlp.up_proj.bias" in msg
        assert "unexpected (1): visual.extra.weight" in msg
        assert "visual.patch_embed.proj.weight: expected (32, 3, 2, 14, 14), found (32, 3, 2, 7, 7)" in msg


def test_published_and_v5_vision_configs():
    # The published Qwen2.5-VL-3B vision_config (in_chans, no rope_parameters) and a v5-style one.
    published = {
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        }
    }
    cfg = hf_config.vision_config_from_hf(published)
    assert (cfg.depth, cfg.hidden_size, cfg.out_hidden_size, cfg.fullatt_block_indexes) == (
        32,
        1280,
        2048,
        (7, 15, 23, 31),
    )
    assert cfg.rope_theta == 10000.0 and cfg.in_channels == 3 and cfg.window_units == 4
    v5 = json.loads(json.dumps(published))
    v5["vision_config"]["in_channels"] = v5["vision_config"].pop("in_chans")
    v5["vision_config"]["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "axial"}
    assert hf_config.vision_config_from_hf(v5) == cfg
    with pytest.raises(CheckpointError, match="hidden_act='gelu'"):
        hf_config.vision_config_from_hf({"vision_config": {"hidden_act": "gelu"}})
    with pytest.raises(CheckpointError, match="no vision_config"):
        hf_config.vision_config_from_hf({"hidden_size": 8})


def test_image_token_count_mismatch_is_an_error(saved):
    model = saved[2]
    grid = np.array([[1, 4, 4]])
    ids = jnp.asarray([[1, VS] + [IMAGE] * 3 + [VE]])  # needs 4
    with pytest.raises(ValueError, match="image 0 has 3 tokens"):
        model(ids, jnp.asarray(_pixels(grid)), grid)
