"""The Qwen2.5 decoder against transformers (fp32), and its own execution modes against each other."""

import dataclasses

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from star_jax import sharding
from star_jax.configs import sizes
from star_jax.convert import load_hf_decoder
from star_jax.decode import text
from star_jax.models import qwen2

RNG = np.random.RandomState(0)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen2_pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2"))
    torch_model = hf_fixtures.save_qwen2(path, tie=request.param)
    return torch_model, load_hf_decoder(path), request.param


@pytest.fixture(scope="module")
def qwen25vl_pair(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen25vl"))
    torch_model = hf_fixtures.save_qwen25vl(path)
    return torch_model, load_hf_decoder(path)


def test_qwen2_logits_match_transformers(qwen2_pair):
    torch_model, model, tie = qwen2_pair
    assert model.cfg.tie_embeddings == tie
    ids = RNG.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert out.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_qwen25vl_mrope_positions_match_transformers(qwen25vl_pair):
    torch_model, model = qwen25vl_pair
    b, t = 2, 20
    ids = RNG.randint(0, 250, (b, t))
    # Distinct t/h/w streams, as an image block produces: text, a 3x4 grid, text again.
    pos = np.zeros((3, b, t), np.int64)
    pos[:, :, :4] = np.arange(4)
    hh, ww = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    pos[0, :, 4:16] = 4
    pos[1, :, 4:16] = 4 + hh.reshape(-1)
    pos[2, :, 4:16] = 4 + ww.reshape(-1)
    pos[:, :, 16:] = 8 + np.arange(4)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), position_ids=torch.tensor(pos)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32)))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # And the M-RoPE streams matter: 1-D positions give different logits.
    out_1d = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(out_1d - ref).max() > 1e-3


@pytest.mark.parametrize("section", [(8, 12, 12), (12, 10, 10), (4, 6, 6)])
def test_interleaved_mrope_tables_match_qwen3vl(section):
    """`mrope_interleaved` against transformers' Qwen3-VL rotary embedding (its cos / sin tables)."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    head_dim = 2 * sum(section)
    hf_cfg = Qwen3VLTextConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=list(section), mrope_interleaved=True),
    )
    pos = RNG.randint(0, 40, (3, 2, 9))
    with torch.no_grad():
        cos_ref, sin_ref = Qwen3VLTextRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))
    cos, sin = qwen2.rope_tables(jnp.asarray(pos), head_dim, 1e6, section, interleaved=True)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-5, rtol=0)
    # Height and width each take some of the highest frequencies, unlike the contiguous layout.
    streams = qwen2.mrope_streams(section, interleaved=True)
    assert list(streams[:3]) == [0, 1, 2]
    assert list(qwen2.mrope_streams(section)[:3]) == [0, 0, 0]


def test_greedy_32_tokens_match_transformers_generate(qwen2_pair):
    torch_model, model, _ = qwen2_pair
    prompts = [RNG.randint(0, 256, 7).tolist(), RNG.randint(0, 256, 11).tolist()]
    ours = text.generate_text(model, prompts, max_new_tokens=32, stop_ids=(255,), pad_id=0)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = torch_model.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=255, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert got == ref


def _tiny(**kw):
    cfg = qwen2.DecoderConfig.from_dict(sizes.get_size("tiny")["decoder"])
    return dataclasses.replace(cfg, **kw)


def _build(cfg, seed=0):
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        return qwen2.Decoder(cfg, rngs=nnx.Rngs(seed))


def test_kv_cache_decoding_equals_full_forward():
    model = _build(_tiny())
    ids = jnp.asarray(RNG.randint(0, 256, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    full = model(ids, positions)
    cache = model.init_cache(2, 16)
    h, cache = model.hidden(model.embed(ids[:, :5]), positions[:, :5], cache)
    steps = [model.logits(h)]
    for i in range(5, 12):
        h, cache = model.hidden(model.embed(ids[:, i : i + 1]), positions[:, i : i + 1], cache)
        steps.append(model.logits(h))
    assert int(cache.index) == 12
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize("fuse", [False, True])
def test_per_layer_cache_decoding_equals_full_forward(fuse):
    """The decode layout (per-layer KV buffers, weights sliced once, optionally fused q/k/v and
    gate/up matmuls) gives the full forward's logits, inside a jitted token loop."""
    model = _build(_tiny())
    ids = jnp.asarray(RNG.randint(0, 256, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    full = model(ids, positions)

    @jax.jit
    def decode(ids, positions):
        h, cache = model.hidden(model.embed(ids[:, :5]), positions[:, :5], model.init_cache(2, 16))
        cache = cache.per_layer()
        assert isinstance(cache.k, tuple) and len(cache.k) == model.cfg.num_layers
        params = model.stack.per_layer_params(fuse=fuse)
        assert (params[0][1] is None) != fuse

        def step(cache, i):
            tok = jax.lax.dynamic_slice_in_dim(ids, i, 1, axis=1)
            pos = jax.lax.dynamic_slice_in_dim(positions, i, 1, axis=1)
            h, cache = model.hidden(model.embed(tok), pos, cache, layer_params=params)
            return cache, model.logits(h)[:, 0]

        cache, logits = jax.lax.scan(step, cache, jnp.arange(5, 12))
        return model.logits(h), jnp.swapaxes(logits, 0, 1), cache.index

    prefill, steps, index = decode(ids, positions)
    assert int(index) == 12
    np.testing.assert_allclose(np.asarray(jnp.concatenate([prefill, steps], 1)), np.asarray(full), atol=1e-5)


def test_scan_on_off_identical_logits():
    scanned = _build(_tiny(scan_layers=True))
    unrolled = _build(_tiny(scan_layers=False))
    nnx.update(unrolled, nnx.state(scanned))  # one param layout for both modes
    ids = jnp.asarray(RNG.randint(0, 256, (2, 9)), jnp.int32)
    np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(unrolled(ids)), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_remat_on_off_identical_gradients(scan):
    ids = jnp.asarray(RNG.randint(0, 256, (2, 9)), jnp.int32)

    def grads(policy):
        model = _build(_tiny(remat_policy=policy, scan_layers=scan))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(ids)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.jit(jax.grad(loss))(params)

    base = grads("none")
    for policy in ("full", "dots"):
        other = grads(policy)
        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other)):
            # Same math; XLA may fuse the recomputed graph differently, so allow f32 rounding only.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bf16_compute_accumulates_in_f32():
    cfg32 = _tiny()
    model32 = _build(cfg32)
    model16 = _build(dataclasses.replace(cfg32, dtype="bfloat16"))
    nnx.update(model16, nnx.state(model32))
    ids = jnp.asarray(RNG.randint(0, 256, (2, 16)), jnp.int32)
    l32, l16 = model32(ids), model16(ids)
    assert l16.dtype == jnp.float32  # logits always float32
    assert model16.stack.layers.attn.q_kernel[...].dtype == jnp.float32  # params stay float32
    rel = float(jnp.abs(l16 - l32).max() / jnp.abs(l32).max())
    assert rel < 0.05


def test_padding_mask_matches_unpadded_rows():
    model = _build(_tiny())
    row = RNG.randint(1, 256, 6).tolist()
    ids, mask = text.left_pad([row, row + row], pad_id=0)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    h, _ = model.hidden(model.embed(jnp.asarray(ids)), positions, attention_mask_2d=jnp.asarray(mask))
    padded = model.logits(h)[0, -6:]
    alone = model(jnp.asarray([row], jnp.int32))[0]
    np.testing.assert_allclose(np.asarray(padded), np.asarray(alone), atol=1e-5)
