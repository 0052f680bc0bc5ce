"""Vision tower: window layout, static vs traced grids under jit, scan / remat / dtype switches, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from star_jax import sharding
from star_jax.configs import sizes
from star_jax.models import vision, vision_preprocess

TINY = vision.VisionConfig.from_dict(sizes.SIZES["tiny"]["vision"])
SHAPES = vision.VisionConfig.from_dict(sizes.SIZES["shapes"]["vision"])


def _tower(cfg, seed=0):
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        return vision.VisionTower(cfg, rngs=nnx.Rngs(seed))


def _pixels(cfg, grid, seed=0):
    n = int(np.prod(np.asarray(grid), axis=-1).sum())
    return jnp.asarray(np.random.RandomState(seed).randn(n, cfg.patch_dim).astype(np.float32))


def test_layout_is_a_window_permutation():
    grid = np.array([[1, 10, 14], [1, 4, 4]])  # tiny: windows of 2 x 2 merged patches, partial at the edges
    layout = vision.vision_layout(grid, TINY)
    n_units = grid.prod(-1).sum() // 4
    assert sorted(layout.window_index) == list(range(n_units))
    np.testing.assert_array_equal(layout.window_index[layout.reverse_index], np.arange(n_units))
    # Image 0: 5 x 7 merged patches -> 3 x 4 windows (sizes 4, 2, 1); image 1: 2 x 2 -> one window.
    sizes_in_units = np.bincount(layout.window_ids) // 4
    assert len(sizes_in_units) == 12 + 1 and sizes_in_units.sum() == n_units
    assert sorted(set(sizes_in_units[:12])) == [1, 2, 4] and sizes_in_units[12] == 4
    # Each window stays inside one image, and its positions are contiguous in rows and columns.
    for wid in range(13):
        members = layout.window_ids == wid
        assert len(set(layout.frame_ids[members])) == 1
        rows, cols = layout.rope_hw[members].T
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4


def test_jit_static_grid_equals_traced_layout():
    tower = _tower(TINY)
    grid = ((1, 6, 8), (1, 4, 4))
    pixels = _pixels(TINY, grid)
    eager = np.asarray(tower(pixels, np.asarray(grid)))
    static = nnx.jit(lambda t, p, g: t(p, g), static_argnums=2)(tower, pixels, grid)
    # One compilation for any grids with the same patch count: the layout is traced data.
    encode = nnx.jit(lambda t, p, layout: t.encode(p, layout))
    traced = encode(tower, pixels, jax.tree.map(jnp.asarray, vision.vision_layout(grid, TINY)))
    other = ((1, 4, 8), (1, 8, 4))  # the same 64 patches, another layout
    other_out = encode(tower, pixels, jax.tree.map(jnp.asarray, vision.vision_layout(other, TINY)))
    np.testing.assert_allclose(np.asarray(static), eager, atol=1e-5)
    np.testing.assert_allclose(np.asarray(traced), eager, atol=1e-5)
    np.testing.assert_allclose(np.asarray(other_out), np.asarray(tower(pixels, other)), atol=1e-5)
    with pytest.raises(TypeError, match="grid_thw must be concrete"):
        nnx.jit(lambda t, p, g: t(p, g))(tower, pixels, jnp.asarray(grid))


def test_equal_frames_attend_per_frame_as_the_masked_block():
    tower = _tower(TINY)
    grid = ((1, 6, 8), (1, 6, 8), (2, 6, 8))  # four equal frames, partial windows at the edges
    pixels = _pixels(TINY, grid)
    layout = vision.vision_layout(grid, TINY)
    assert vision._uniform_frame_length(layout) == 48
    assert vision._uniform_frame_length(vision.vision_layout(((1, 6, 8), (1, 8, 6)), TINY)) is None
    # Traced, the layout's uniformity is unknown: one [N, N] masked block.
    dense = nnx.jit(lambda t, p, layout: t.encode(p, layout))(tower, pixels, jax.tree.map(jnp.asarray, layout))
    np.testing.assert_allclose(np.asarray(tower(pixels, grid)), np.asarray(dense), atol=1e-5)


@pytest.mark.slow
def test_images_are_independent():
    # Attention never crosses images: encoding two images together = encoding each alone.
    tower = _tower(TINY)
    grids = [(1, 6, 8), (1, 4, 6)]
    a, b = _pixels(TINY, [grids[0]], 1), _pixels(TINY, [grids[1]], 2)
    both = np.asarray(tower(jnp.concatenate([a, b]), grids))
    alone = np.concatenate([np.asarray(tower(a, [grids[0]])), np.asarray(tower(b, [grids[1]]))])
    np.testing.assert_allclose(both, alone, atol=1e-5)


def test_window_blocks_differ_from_full_attention():
    grid = [(1, 8, 8)]  # 4 x 4 merged = four windows
    pixels = _pixels(TINY, grid)
    windowed = _tower(TINY)(pixels, grid)
    full = _tower(vision.VisionConfig.from_dict(sizes.SIZES["tiny"]["vision"], fullatt_block_indexes=(0, 1)))
    assert np.abs(np.asarray(full(pixels, grid)) - np.asarray(windowed)).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_unrolled_and_remat_agree(remat):
    grid = [(1, 4, 6)]
    pixels = _pixels(TINY, grid)
    towers = [
        _tower(vision.VisionConfig.from_dict(sizes.SIZES["tiny"]["vision"], scan_layers=s, remat_policy=remat))
        for s in (True, False)
    ]

    def loss(tower):
        return jnp.sum(tower(pixels, grid) ** 2)

    grads = [nnx.grad(loss)(t) for t in towers]
    np.testing.assert_allclose(np.asarray(towers[0](pixels, grid)), np.asarray(towers[1](pixels, grid)), atol=1e-5)
    for g0, g1 in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(g0), np.asarray(g1), atol=1e-4)


@pytest.mark.slow
def test_shapes_size_on_a_64px_render_in_bf16():
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 20:44] = (200, 30, 30)
    pixels, grid = vision_preprocess.preprocess([image], min_pixels=64 * 64, max_pixels=64 * 64, patch_size=8)
    assert grid.tolist() == [[1, 8, 8]]
    f32 = _tower(SHAPES)(jnp.asarray(pixels), grid)
    bf16_cfg = vision.VisionConfig.from_dict(sizes.SIZES["shapes"]["vision"], dtype="bfloat16")
    bf16 = _tower(bf16_cfg)(jnp.asarray(pixels), grid)
    assert f32.shape == (16, 256) and bf16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(bf16, np.float32) - np.asarray(f32)).max() < 0.05 * np.abs(np.asarray(f32)).max()


def test_params_born_sharded_on_a_2x2x2_mesh():
    mesh = sharding.make_mesh((2, 2, 2))
    tower = sharding.create_sharded(lambda: vision.VisionTower(SHAPES, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)
    names = dict(sharding.param_logical_names(nnx.state(tower)))
    assert names["blocks/attn/qkv_kernel"] == ("layers", "embed", None, "heads", "head_dim")
    assert names["patch_kernel"] == ("patch", "embed")
    assert sharding.sharded_fraction(tower) > 0.9
    grid = [(1, 8, 8)]
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        out = tower(_pixels(SHAPES, grid), grid)
    assert out.shape == (16, 256) and np.isfinite(np.asarray(out)).all()


def test_config_errors_name_the_field():
    base = dict(sizes.SIZES["tiny"]["vision"])
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_size=32"):
        vision.VisionConfig.from_dict(base, num_heads=3)
    with pytest.raises(ValueError, match=r"fullatt_block_indexes=\(5,\)"):
        vision.VisionConfig.from_dict(base, fullatt_block_indexes=(5,))
    with pytest.raises(ValueError, match="window_size=14"):
        vision.VisionConfig.from_dict(base, window_size=14)
    with pytest.raises(ValueError, match="vision param_dtype='fp8'"):
        vision.VisionConfig.from_dict(base, param_dtype="fp8")
    with pytest.raises(ValueError, match="unknown keys"):
        vision.VisionConfig.from_dict(base, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"grid_thw row \(1, 3, 4\)"):
        vision.vision_layout([(1, 3, 4)], TINY)
    with pytest.raises(ValueError, match="pixel_values shape"):
        _tower(TINY)(jnp.zeros((16, 10)), [(1, 4, 4)])


def test_tower_spreads_the_batch_images_over_the_devices():
    """On a (data=2, fsdp=4) mesh the flat tokens of 8 equal images are sharded over all 8 devices
    (each device runs the ViT on its own images), and the output equals the single-device one."""
    grid = [(1, 4, 4)] * 8
    single = _tower(TINY)
    want = np.asarray(single(_pixels(TINY, grid), grid))
    mesh = sharding.make_mesh((2, 4, 1))
    sharded = sharding.create_sharded(lambda: vision.VisionTower(TINY, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)
    layout = vision.vision_layout(grid, TINY)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        encode = jax.jit(lambda m, x: m.encode(x, layout))
        hlo = encode.lower(sharded, _pixels(TINY, grid)).as_text()
        got = np.asarray(encode(sharded, _pixels(TINY, grid)))
    assert '[{"data", "fsdp"}, {}]' in hlo, "the ViT tokens are not constrained to the batch axes"
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
