"""STAR-VQ model: reference sizes by abstract init, shapes, straight-through gradient, sharding, options."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from star_jax import sharding
from star_jax.configs import sizes
from star_jax.models import vq


def _abstract(cfg, mesh=None):
    mesh = mesh or sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        return nnx.get_abstract_model(lambda: vq.VQModel(cfg, rngs=nnx.Rngs(0)), mesh)


def _tiny(**overrides):
    """The tiny size with two levels at 16 px (8 x 8 codes): small enough to compile fast."""
    cfg = vq.VQConfig.from_size("tiny", **({"ch_mult": (1, 2), "image_size": 16} | overrides))
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        return vq.VQModel(cfg, rngs=nnx.Rngs(0))


def test_reference_size_parameter_counts_abstract():
    cfg = vq.VQConfig.from_dict(sizes.STAR_VQ)
    assert cfg == vq.VQConfig()  # the dataclass defaults are the reference
    _, state = _abstract(cfg)
    counts = vq.param_counts(state)
    assert abs(counts["total"] - 1.057e9) / 1.057e9 < 0.005, counts
    assert abs(counts["encoder"] - 414e6) / 414e6 < 0.005, counts
    assert abs(counts["decoder"] - 610e6) / 610e6 < 0.005, counts
    assert counts["quantize"] == 65536 * 512  # 33.6 M
    assert state["quantize"]["codebook_used"].get_value().shape == (65537,)


def test_reference_size_384_encodes_to_24x24_abstract():
    cfg = vq.VQConfig()
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):

        def run(images):
            model = vq.VQModel(cfg, rngs=nnx.Rngs(0))
            codes = model.encode_to_codes(images)
            return codes, model.decode_codes(codes)

        codes, images = jax.eval_shape(run, jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32))
    assert codes.shape == (2, 24, 24) and codes.dtype == jnp.int32
    assert images.shape == (2, 384, 384, 3) and images.dtype == jnp.float32


def test_reference_size_shards_on_8_devices():
    mesh = sharding.make_mesh((2, 2, 2))
    _, state = _abstract(vq.VQConfig(), mesh)
    sharding.check_state_sharding(state, sharding.DEFAULT_RULES, mesh)
    total = split = 0
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        total += value.size
        split += value.size if not value.sharding.is_fully_replicated else 0
    assert split / total > 0.99  # every conv kernel and the codebook are split


def test_shapes_size_64px_to_8x8_codes():
    cfg = vq.VQConfig.from_size("shapes")
    assert cfg.image_size == 64 and cfg.grid_size == 8
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        codes = jax.eval_shape(
            lambda x: vq.VQModel(cfg, rngs=nnx.Rngs(0)).encode_to_codes(x),
            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
        )
    assert codes.shape == (1, 8, 8)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="norm_groups=24"):
        vq.VQConfig(norm_groups=24)
    with pytest.raises(ValueError, match="attn_heads=3"):
        vq.VQConfig(attn_heads=3)
    with pytest.raises(ValueError, match="image_size=100"):
        vq.VQConfig(image_size=100)
    with pytest.raises(ValueError, match="chunk_size=1000"):
        vq.VQConfig(chunk_size=1000)
    with pytest.raises(ValueError, match="unknown keys \\['chmult'\\]"):
        vq.VQConfig.from_dict({"chmult": 1})
    with pytest.raises(ValueError, match="dtype"):
        vq.VQConfig(dtype="float8")
    with pytest.raises(ValueError, match="patch_size=0"):
        vq.VQConfig(patch_size=0)
    with pytest.raises(ValueError, match="image_size=64 must be divisible by 128"):
        vq.VQConfig(image_size=64, ch_mult=(1, 2, 2, 2), patch_size=16)
    with pytest.raises(ValueError, match="local_encoder=True needs one conv level.*ch_mult=\\(1, 2\\)"):
        vq.VQConfig(local_encoder=True, ch_mult=(1, 2), image_size=32, patch_size=4)
    with pytest.raises(ValueError, match="local_context=1 must be >= 0 and needs local_encoder=True"):
        vq.VQConfig(local_context=1)


def test_pixel_shuffle_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    ours = np.asarray(vq.pixel_unshuffle(jnp.asarray(x), 4))
    ref = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x).permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(ours, ref.numpy())  # a pure permutation: bit-exact
    np.testing.assert_array_equal(np.asarray(vq.pixel_shuffle(jnp.asarray(ours), 4)), x)


@pytest.mark.slow
def test_patch_stem_equals_unshuffled_model():
    """patch_size p is a pixel unshuffle before, and a pixel shuffle after, a model on p*p*3 channels."""
    patched = _tiny(patch_size=2, image_size=32)
    plain = _tiny(in_channels=12, image_size=16)  # same init order and shapes -> same params
    assert (
        patched.cfg.grid_size
        == plain.cfg.grid_size
        == 8
        == vq.grid_size(dict(image_size=32, patch_size=2, ch_mult=(1, 2)))
    )
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    z = patched.encode_continuous(x)
    np.testing.assert_allclose(z, plain.encode_continuous(vq.pixel_unshuffle(x, 2)), atol=1e-6)
    np.testing.assert_allclose(patched.decode(z), vq.pixel_shuffle(plain.decode(z), 2), atol=1e-6)
    recon, q = patched(x)
    assert recon.shape == x.shape and q.indices.shape == (2, 8, 8)


@pytest.mark.parametrize("context", [0, 1, None])
def test_local_encoder_codes_see_only_their_neighbourhood(context):
    """With local_encoder a code is a function of its own patch and `local_context` neighbours per
    side: editing patches farther away leaves it bit-identical, and equal neighbourhoods get equal
    codes. The default encoder (context=None: 3x3 convs, GroupNorm, attention) mixes in the whole
    image, which the same edit shows."""
    local = context is not None
    model = _tiny(patch_size=4, image_size=32, ch_mult=(1,), local_encoder=local, local_context=context or 0)
    rng = np.random.RandomState(0)
    x = np.full((1, 32, 32, 3), 0.2, np.float32)
    x[0, 4:8, 8:12] = rng.uniform(-1, 1, (4, 4, 3))  # one textured patch at code (1, 2)
    edited = x.copy()
    edited[0, 16:, 16:] = rng.uniform(-1, 1, (16, 16, 3))  # every code below and right of (3, 3)
    z, z_edited = (np.asarray(model.encode_continuous(jnp.asarray(a))) for a in (x, edited))
    reach = context or 0
    untouched = np.ones((8, 8), bool)
    untouched[4 - reach :, 4 - reach :] = False  # codes whose neighbourhood the edit reaches
    if local:
        np.testing.assert_array_equal(z[0][untouched], z_edited[0][untouched])
        if context:
            assert np.abs(z[0, 3, 3] - z_edited[0, 3, 3]).max() > 1e-3  # the edit is in (3, 3)'s reach
        # Interior codes that do not see the textured patch all encode alike.
        far = np.zeros((8, 8), bool)
        far[reach : 8 - reach, reach : 8 - reach] = True
        far[1 - reach : 2 + reach + 1, 2 - reach : 2 + reach + 1] = False
        assert np.ptp(z[0][far], axis=0).max() == 0
        assert len(model.encoder.mid) == 2 and not len(model.encoder.conv_blocks[0].attn)
        assert model.encoder.conv_in.kernel.shape[:2] == (2 * reach + 1,) * 2
    else:
        assert np.abs(z[0][untouched] - z_edited[0][untouched]).max() > 1e-3
    recon, q = model(jnp.asarray(x))
    assert recon.shape == x.shape and q.indices.shape == (1, 8, 8)


@pytest.mark.slow
def test_straight_through_encoder_gradient():
    """The encoder's gradient through the quantizer equals the unquantised path's gradient
    (the downstream gradient taken at z_q, as the straight-through estimator defines it)."""
    model = _tiny()
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    weights = jax.random.normal(jax.random.key(1), (2, 8, 8, model.cfg.codebook_dim))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def downstream(z):  # any non-linear function of the quantised vectors
        return jnp.sum(jnp.sin(3.0 * z) * weights)

    def through_quantizer(p):
        m = nnx.merge(graphdef, p, rest)
        return downstream(m.quantize(m.encode_continuous(images)).z_q)

    z, z_q = nnx.jit(lambda m: (m.encode_continuous(images), m.encode(images).z_q))(model)
    g_zq = jax.grad(downstream)(z_q)

    def unquantised(p):  # the encoder alone, contracted with the downstream gradient at z_q
        return jnp.sum(nnx.merge(graphdef, p, rest).encode_continuous(images) * g_zq)

    g_st = jax.jit(jax.grad(through_quantizer))(params)
    g_ref = jax.jit(jax.grad(unquantised))(params)
    leaves_st, leaves_ref = jax.tree.leaves(g_st["encoder"]), jax.tree.leaves(g_ref["encoder"])
    assert len(leaves_st) > 20 and len(leaves_st) == len(leaves_ref)
    scale = max(float(jnp.abs(a).max()) for a in leaves_ref)
    assert scale > 0
    for a, b in zip(leaves_st, leaves_ref):  # equal up to float rounding of two compiled programs
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
    # and the quantizer is not the identity: z_q differs from z
    assert float(jnp.abs(z_q - z).max()) > 1e-3


def test_forward_losses_usage_and_jit():
    model = _tiny(ch_mult=(1, 2, 2), image_size=32)
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)

    @nnx.jit
    def step(m, x):
        recon, q = m(x, update_usage=True)
        return recon, q, m.quantize.usage_metrics(q.indices), m.encode_to_codes(x)

    recon, q, metrics, codes = step(model, images)
    assert recon.shape == images.shape and recon.dtype == jnp.float32
    assert q.indices.shape == (2, 8, 8)
    np.testing.assert_allclose(float(q.commit_loss), 0.25 * float(q.codebook_loss), rtol=1e-5)
    used = np.asarray(model.quantize.codebook_used[...])
    # the window (K + 1 = 65 slots) holds the 65 most recent of the 128 codes, in raster order
    np.testing.assert_array_equal(used, np.asarray(q.indices).reshape(-1)[-65:])
    assert 0 < float(metrics["codebook_usage"]) <= 1 and 1 <= float(metrics["perplexity"]) <= 64
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.indices))


@pytest.mark.slow
def test_remat_bf16_and_dropout_paths():
    cfg = vq.VQConfig.from_size("tiny", dropout=0.5)
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        level = vq.ConvBlock(16, 32, 1, attn=True, resample="down", cfg=cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 16))

    def loss(m, remat):
        return jnp.sum(jnp.sin(m(x, None, remat)))

    grads = [nnx.jit(nnx.value_and_grad(loss), static_argnums=1)(level, remat) for remat in (False, True)]
    np.testing.assert_allclose(float(grads[1][0]), float(grads[0][0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(grads[1][1])), jax.tree.leaves(nnx.state(grads[0][1]))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    block = level.res[0]  # dropout 0.5 between its convs
    np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(block(x)))  # no rngs: deterministic
    assert not np.allclose(np.asarray(block(x, nnx.Rngs(dropout=1))), np.asarray(block(x)))

    images = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1, maxval=1)
    bf16 = _tiny(dtype="bfloat16")
    out, ref = nnx.jit(lambda a, b: (a.encode_continuous(images), b.encode_continuous(images)))(bf16, _tiny())
    assert out.dtype == jnp.float32 and bf16.encoder.conv_in.kernel[...].dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_sharded_tiny_on_2x2x2_matches_one_device():
    mesh = sharding.make_mesh((2, 2, 2))
    single = _tiny()
    _, abstract = _abstract(single.cfg, mesh)
    graphdef, state = nnx.split(single)
    model = nnx.merge(graphdef, jax.device_put(state, jax.tree.map(lambda a: a.sharding, abstract)))
    assert not model.quantize.embedding[...].sharding.is_fully_replicated
    assert not model.encoder.conv_blocks[1].res[0].conv1.kernel[...].sharding.is_fully_replicated
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
    encode = nnx.jit(lambda m, x: m.encode(x))
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        q = encode(model, images)
    assert q.z_q.sharding.spec[0] == ("data", "fsdp")  # batch-sharded activations
    q1 = encode(single, images)
    np.testing.assert_array_equal(np.asarray(q.indices), np.asarray(q1.indices))
    np.testing.assert_allclose(np.asarray(q.z_q), np.asarray(q1.z_q), atol=1e-5)
    assert math.prod(q.indices.shape) == 4 * 8 * 8


def test_objectives_pure_functions():
    from star_jax import objectives_vq as ov
    from star_jax.models import quantizer as qz

    x = jnp.zeros((2, 4, 4, 3))
    y = x.at[0].set(0.5)
    assert float(ov.l2_reconstruction(x, y)) == pytest.approx(0.125)
    # PSNR: image 0 has MSE 0.0625 in [0, 1] units -> 12.04 dB; image 1 is exact (capped at 100 dB)
    assert float(ov.psnr(x, y)) == pytest.approx((10 * np.log10(1 / 0.0625) + 100.0) / 2, rel=1e-5)
    assert float(ov.hinge_discriminator_loss(jnp.array([2.0, 0.0]), jnp.array([-2.0, 1.0]))) == pytest.approx(
        0.5 * (0.5 + 1.0)
    )
    assert float(ov.hinge_generator_loss(jnp.array([1.0, 3.0]))) == -2.0
    q = qz.QuantizerOutput(y, jnp.zeros((2, 4, 4), jnp.int32), jnp.float32(0.2), jnp.float32(0.05), jnp.float32(0.0))
    logits = jnp.full((2, 3, 3, 1), 2.0)
    before, parts = ov.vq_generator_loss(x, y, q, logits, jnp.int32(5), disc_start=10)
    after, _ = ov.vq_generator_loss(x, y, q, logits, jnp.int32(10), disc_start=10)
    assert float(before) == pytest.approx(0.125 + 0.25) and float(parts["gen_adv"]) == -2.0
    assert float(after) == pytest.approx(0.125 + 0.25 - 0.5 * 2.0)
    d0, _ = ov.discriminator_hinge_loss(logits, -logits, jnp.int32(0), disc_start=1)
    d1, m = ov.discriminator_hinge_loss(logits, -logits, jnp.int32(1), disc_start=1)
    assert float(d0) == 0.0 and float(d1) == 0.0 and float(m["logits_real"]) == 2.0
    usage = ov.usage_metrics(jnp.arange(4), jnp.array([0.0, 1, -1]), 8)
    assert float(usage["codebook_usage"]) == 0.25 and float(usage["perplexity"]) == pytest.approx(4.0)


def test_perceptual_hook(tmp_path):
    from star_jax import objectives_vq as ov
    from star_jax.convert import tensor_io

    assert ov.make_perceptual_loss(None, 0.0) is None
    with pytest.raises(ov.PerceptualWeightsMissing, match="perceptual loss weight is 1.0 but no LPIPS/VGG weights"):
        ov.make_perceptual_loss(None, 1.0)
    # LPIPS-VGG layout with narrow random layers (the real file is torchvision vgg16 + LPIPS lin)
    rng, tensors, c = np.random.RandomState(0), {}, 3
    for i in ov.VGG16_CONVS:
        tensors[f"features.{i}.weight"] = rng.normal(0, 0.3, (8, c, 3, 3)).astype(np.float32)
        tensors[f"features.{i}.bias"] = rng.normal(0, 0.1, (8,)).astype(np.float32)
        c = 8
    for k in range(5):
        tensors[f"lin{k}.model.1.weight"] = rng.uniform(0, 1, (1, 8, 1, 1)).astype(np.float32)
    path = str(tmp_path / "lpips.safetensors")
    tensor_io.save_safetensors(path, tensors)
    loss = ov.make_perceptual_loss(path, 1.0)
    a = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    assert abs(float(loss(a, a))) < 1e-9 and float(loss(a, -a)) > 1e-3
    del tensors["lin4.model.1.weight"]
    tensor_io.save_safetensors(path, tensors)
    with pytest.raises(KeyError, match="lin4.model.1.weight"):
        ov.make_perceptual_loss(path, 1.0)


def test_patchgan_discriminator():
    from star_jax.models import discriminator as disc

    cfg = disc.DiscriminatorConfig(ndf=8, n_layers=3, norm_groups=4)
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        d = disc.PatchGANDiscriminator(cfg, rngs=nnx.Rngs(0))
    logits = nnx.jit(lambda m, x: m(x))(d, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 2, 2, 1) and logits.dtype == jnp.float32  # 32 / 8 - 2
    counts = sum(v.size for v in jax.tree.leaves(nnx.state(d, nnx.Param)))
    assert counts == (3 * 8 + 8 * 16 + 16 * 32 + 32 * 64 + 64) * 16 + (8 + 16 + 32 + 64 + 1) + 2 * (16 + 32 + 64)
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        plain = disc.PatchGANDiscriminator(dataclasses.replace(cfg, norm="none"), rngs=nnx.Rngs(0))
    assert sum(v.size for v in jax.tree.leaves(nnx.state(plain, nnx.Param))) == counts - 2 * (16 + 32 + 64)
    with pytest.raises(ValueError, match="norm_groups=5"):
        disc.DiscriminatorConfig(ndf=8, norm_groups=5)


@pytest.mark.slow
def test_decoder_head_split_and_adaptive_gan_weight():
    """features + head is the decoder; the adaptive GAN weight, computed through `head` alone, equals
    the ratio of the last layer's gradients taken through the whole decoder."""
    from star_jax import objectives_vq

    model = _tiny(patch_size=2, image_size=32)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    z = model.post_quant_conv(model.encode(x).z_q)
    feats = model.decoder.features(z)
    np.testing.assert_array_equal(model.decoder.head(feats), model.decoder(z))
    w0 = model.decoder.conv_out.kernel[...]
    np.testing.assert_array_equal(model.decoder.head(feats, w0), model.decoder(z))

    probe = jnp.asarray(np.random.RandomState(1).normal(size=(32, 32, 3)), jnp.float32)
    disc = lambda images: jnp.sum(images * probe, axis=(1, 2, 3))  # any function of the images
    gan = lambda images: objectives_vq.hinge_generator_loss(disc(images))
    weight = objectives_vq.adaptive_gan_weight(
        lambda w: objectives_vq.l2_reconstruction(x, model.decoder.head(feats, w)),
        lambda w: gan(model.decoder.head(feats, w)),
        w0,
    )
    g_rec = nnx.grad(lambda d: objectives_vq.l2_reconstruction(x, d(z)))(model.decoder)["conv_out"]["kernel"]
    g_gan = nnx.grad(lambda d: gan(d(z)))(model.decoder)["conv_out"]["kernel"]
    expected = np.linalg.norm(g_rec[...]) / (np.linalg.norm(g_gan[...]) + 1e-4)
    assert expected > 0
    np.testing.assert_allclose(weight, expected, rtol=1e-5)
