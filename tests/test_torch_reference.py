"""star_jax CFG decoding against the PyTorch reference loop (transformers Qwen2 layers, dynamic
caches, paired rows) on the same weights: greedy fp32 image tokens are identical on `shapes`."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from star_jax.bench import generate as generate_bench  # noqa: E402
from star_jax.bench import torch_reference  # noqa: E402
from star_jax.decode import generate  # noqa: E402

N_TOKENS = 64  # the shapes size's image: 8 x 8 codes


@pytest.fixture(scope="module")
def models():
    model = generate_bench.random_star("shapes", seed=0)
    assert generate_bench.image_tokens(model.vq_cfg) == N_TOKENS
    # One torch thread: on a shared CPU its OpenMP threads otherwise spin against other processes.
    previous = torch_reference.set_num_threads(1)
    yield model, torch_reference.TorchStar.from_star(model)
    torch_reference.set_num_threads(previous)


def _batch(n=3, tp=24, pad=(0, 5, 2), seed=1):
    """n prompts, row i left-padded by pad[i] (padding id 0, mask False, positions 0 there)."""
    batch = generate_bench.synthetic_batch(n, tp, N_TOKENS, vocab=512, seed=seed)
    for i, p in enumerate(pad):
        if p:
            real = generate_bench.synthetic_batch(1, tp - p, N_TOKENS, vocab=512, seed=seed + 1 + i)
            for key in ("prompt_ids", "uncond_ids"):
                batch[key][i] = np.concatenate([np.zeros(p, np.int32), real[key][0]])
            batch["prompt_mask"][i, :p] = False
            batch["positions"][i] = np.concatenate([np.zeros((3, p), np.int32), real["positions"][0]], axis=1)
    return batch


def test_weights_go_through_the_mapping_table(models):
    model, ref = models
    tensors = torch_reference.reference_state_dict(model)
    cfg = model.decoder_cfg
    assert len([k for k in tensors if k.startswith("llm.model.layers.")]) == 12 * cfg.num_layers
    assert len([k for k in tensors if k.startswith("stacked_ar.model.layers.")]) == 12 * model.star_cfg.stack_layers
    # q kernel [D, H, hd] -> torch (H * hd, D); the head (D, K) -> (K, D).
    q = np.asarray(model.base.stack.layers.attn.q_kernel.get_value())[1]
    np.testing.assert_array_equal(ref.base.layers[1].self_attn.q_proj.weight.numpy(), q.reshape(q.shape[0], -1).T)
    np.testing.assert_array_equal(ref.head.weight.numpy(), np.asarray(model.image_head.kernel.get_value()).T)


def test_greedy_fp32_tokens_equal_reference_loop(models):
    model, ref = models
    batch = _batch()
    codes, logits = generate.generate_codes(
        model, batch, num_tokens=N_TOKENS, cfg_weight=3.0, temperature=0.0, return_logits=True
    )
    ref_codes, ref_logits = torch_reference.generate_codes(
        ref,
        batch,
        num_tokens=N_TOKENS,
        sample=torch_reference.SampleConfig(cfg_weight=3.0, temperature=0.0),
        return_logits=True,
    )
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    assert len(np.unique(ref_codes)) > 8  # a non-degenerate image: many distinct codes


def test_guidance_changes_reference_tokens(models):
    _, ref = models
    batch = _batch(n=1, pad=(0,))
    run = lambda w: torch_reference.generate_codes(
        ref, batch, num_tokens=8, sample=torch_reference.SampleConfig(cfg_weight=w, temperature=0.0)
    )
    assert not np.array_equal(run(1.0), run(5.0))
