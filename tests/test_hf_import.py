"""HF import: both config.json shapes, sharded indexes, and every bad-directory error."""

import json
import os
import shutil

import hf_fixtures
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from star_jax.convert import hf_config, load_hf_decoder, tensor_io
from star_jax.convert.table import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("q2"))
    model = hf_fixtures.save_qwen2(path, tie=False)
    return path, model


def _copy(src, tmp_path):
    dst = str(tmp_path / "model")
    shutil.copytree(src, dst)
    return dst


def test_published_config_shape():
    # The shape of the published Qwen2.5-VL-3B config.json: text keys at the top level.
    published = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_attention_heads": 16,
        "num_hidden_layers": 36,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True,
        "vocab_size": 151936,
        "vision_config": {"depth": 32},
    }
    cfg = hf_config.decoder_config_from_hf(published)
    assert (cfg.hidden_size, cfg.num_layers, cfg.head_dim, cfg.mrope_section) == (2048, 36, 128, (16, 24, 24))
    assert cfg.rope_theta == 1e6 and cfg.tie_embeddings
    v5 = {
        "text_config": {k: v for k, v in published.items() if k not in ("rope_theta", "rope_scaling", "vision_config")}
    }
    v5["text_config"]["rope_parameters"] = {"rope_theta": 1e6, "mrope_section": [16, 24, 24], "rope_type": "default"}
    v5["tie_word_embeddings"] = True
    assert hf_config.decoder_config_from_hf(v5) == cfg


def test_sharded_index_directory(saved, tmp_path):
    _, torch_model = saved
    path = str(tmp_path / "sharded")
    torch_model.save_pretrained(path, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ids = np.random.RandomState(1).randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(load_hf_decoder(path)(jnp.asarray(ids))), ref, atol=1e-4)


def test_missing_weights_file(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_decoder(path)


def test_missing_config(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_decoder(path)


def test_pickle_is_refused(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(saved[1].state_dict(), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pickle.*safetensors only"):
        load_hf_decoder(path)


def test_missing_unexpected_and_misshaped_tensors_listed_together(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = dict(tensor_io.SafetensorsFile(file))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(7, np.float32)
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    tensor_io.save_safetensors(file, tensors)
    with pytest.raises(CheckpointError) as e:
        load_hf_decoder(path)
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.bias: expected (64,), found (7,)" in msg


def test_truncated_file(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError, match="ends at byte"):
        load_hf_decoder(path)


def test_corrupt_config(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_hf_decoder(path)


def test_safetensors_roundtrip_bf16(tmp_path):
    import ml_dtypes

    x = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16), "b": np.ones(4, np.int32)}
    file = str(tmp_path / "t.safetensors")
    tensor_io.save_safetensors(file, x, metadata={"format": "pt"})
    back = tensor_io.SafetensorsFile(file)
    assert back.metadata == {"format": "pt"}
    for k in x:
        assert back[k].dtype == x[k].dtype and np.array_equal(back[k], x[k])
    # Readable by the reference library too.
    from safetensors.torch import load_file

    assert load_file(file)["a"].dtype == torch.bfloat16
    json.dumps(back.metadata)
