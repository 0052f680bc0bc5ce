"""init_sources: hf: / vq: / star: sources loaded straight into the target shardings on an 8-device mesh,
initialise (a generation stage started from a vq: file), hf config checks, load_workdir errors."""

import json
import os

import hf_fixtures
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from star_jax import init_sources, sharding
from star_jax.configs import star as star_config
from star_jax.convert import hf_config, importer, star_table, table, tensor_io, vq_table
from star_jax.convert.stage_reader import build_star
from star_jax.models import qwen2, vision


def tiny_config(ici=(1, 4, 2)):
    config = star_config.get_config("size=tiny,stage=generation,runlocal")
    config.mesh.ici = ici
    config.model.decoder.dtype = "float32"
    return config


def sharded_model(config, seed: int = 0):
    """The stage's model built sharded on config.mesh, every variable random (fast: no initialisers run)."""
    rules = sharding.rules_from_config(config)
    one = tuple(config.mesh.ici) == (1, 1, 1)
    mesh = sharding.single_device_mesh() if one else sharding.mesh_from_config(config)
    with sharding.use_mesh(mesh, rules):
        graphdef, state = nnx.get_abstract_model(lambda: build_star(config, rngs=nnx.Rngs(0)), mesh)
    sharding.check_state_sharding(state, rules, mesh)
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(state):
        a = var.get_value()
        value = np.full(a.shape, -1.0) if path[-1] == "codebook_used" else 0.1 * rng.randn(*a.shape)
        var.set_value(table.place(np.asarray(value).astype(a.dtype), a.sharding))
    return nnx.merge(graphdef, state), mesh, rules


def save_hf(path: str, config, seed: int = 0):
    """A random Qwen2.5-VL with the sizes of `config.model` saved with transformers' save_pretrained."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = config.model.decoder
    text, vis = hf_fixtures.qwen25vl_parts(d, config.model.vision)
    hf_cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vis, tie_word_embeddings=d.tie_embeddings)
    torch.manual_seed(seed)
    model = hf_fixtures.randomize_(Qwen2_5_VLForConditionalGeneration(hf_cfg), seed).eval()
    model.save_pretrained(path)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def reference_vq(model, seed: int = 1) -> dict[str, np.ndarray]:
    """Random VQ weights in the reference (torch) layout for `model.vq`'s params, plus the reference's
    int64 usage buffer (65,536 counters: not the star_jax window)."""
    rng = np.random.RandomState(seed)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model.vq, nnx.Param)):
        name, transform = vq_table.ref_name("/".join(map(str, path)))
        out[name] = rng.randn(*transform.ref_shape(var.get_value().shape)).astype(np.float32)
    out[vq_table.USAGE_NAME] = np.arange(65536, dtype=np.int64)
    return out


def values(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in init_sources.param_targets(model).items()}


def assert_shards_only(model, mesh):
    """Every param is split as its sharding says, and params sharded over fsdp are actually split."""
    split = 0
    for path, x in init_sources.param_targets(model).items():
        want = x.sharding.shard_shape(x.shape)
        assert all(s.data.shape == want for s in x.addressable_shards), path
        axes = [a for entry in x.sharding.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        if "fsdp" in axes and mesh.shape["fsdp"] > 1:
            assert want != x.shape, path
            split += 1
    assert split > 20


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf"))
    return path, save_hf(path, tiny_config())


def test_generation_stage_from_hf_and_vq_on_8_devices_shard_by_shard(hf_dir, tmp_path, monkeypatch):
    path, torch_state = hf_dir
    config = tiny_config()
    model, mesh, rules = sharded_model(config)
    assert mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
    vq_ref = reference_vq(model)
    vq_file = str(tmp_path / "vq.pt")  # a raw state dict, with the reference's int64 usage buffer
    torch.save({k: torch.from_numpy(v) for k, v in vq_ref.items()}, vq_file)
    config.train.init_from = (f"hf:{path}", f"vq:{vq_file}")
    before = values(model)

    # No host array reaches a device whole: every placement hands each device its own slice.
    real_callback, real_put, slices = jax.make_array_from_callback, jax.device_put, []

    def callback_spy(shape, sharding_, fn, *a, **kw):
        def checked(index):
            piece = fn(index)
            assert piece.shape == sharding_.shard_shape(shape), (shape, index)
            slices.append(piece.shape)
            return piece

        return real_callback(shape, sharding_, checked, *a, **kw)

    def put_spy(x, *a, **kw):
        assert not (isinstance(x, np.ndarray) and x.size > 64), f"device_put of a whole host array {x.shape}"
        return real_put(x, *a, **kw)

    monkeypatch.setattr(jax, "make_array_from_callback", callback_spy)
    monkeypatch.setattr(jax, "device_put", put_spy)
    with sharding.use_mesh(mesh, rules):
        init_sources.initialise(model, config, str(tmp_path))
    monkeypatch.undo()
    assert len(slices) >= 8 * 50

    got = values(model)
    assert_shards_only(model, mesh)
    # Layouts checked by hand: torch Linear (out, in) -> Flax (in, out); Conv3d -> [C*T*P*P, out]; Conv2d.
    np.testing.assert_array_equal(got["base/embedding"], torch_state["model.language_model.embed_tokens.weight"])
    q = torch_state["model.language_model.layers.3.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(got["base/stack/layers/attn/q_kernel"][3].reshape(q.shape[1], -1), q.T)
    patch = torch_state["model.visual.patch_embed.proj.weight"]
    np.testing.assert_array_equal(got["vision/patch_kernel"], patch.reshape(patch.shape[0], -1).T)
    qkv_b = torch_state["model.visual.blocks.1.attn.qkv.bias"]
    np.testing.assert_array_equal(got["vision/blocks/attn/qkv_bias"][1].reshape(-1), qkv_b)
    conv_in = vq_ref["encoder.conv_in.weight"]
    np.testing.assert_array_equal(got["vq/encoder/conv_in/kernel"], conv_in.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(got["vq/quantize/embedding"], vq_ref["quantize.embedding.weight"])
    # The stack was loaded by no source: copied from the base's last layers.
    n = config.model.star.stack_layers
    np.testing.assert_array_equal(got["stacked_ar/layers/mlp/up/kernel"], got["base/stack/layers/mlp/up/kernel"][-n:])
    # Every base / vision / vq param changed; the adapter and head (no source) kept their values.
    for k in got:
        if k.startswith(("base/", "vision/", "vq/", "stacked_ar/")):
            assert not np.array_equal(got[k], before[k]), k
        else:
            np.testing.assert_array_equal(got[k], before[k], err_msg=k)
    usage = np.asarray(model.vq.quantize.codebook_used[...])  # not a param: the int64 buffer is skipped
    assert usage.dtype == np.float32 and (usage == -1).all()


def test_generation_stage_starts_from_a_vq_file(tmp_path):
    config = tiny_config(ici=(2, 4, 1))
    model, mesh, rules = sharded_model(config, seed=3)
    first, second = reference_vq(model, seed=5), reference_vq(model, seed=6)
    del first[vq_table.USAGE_NAME]
    a = str(tmp_path / "a.safetensors")  # standalone names
    tensor_io.save_safetensors(a, first)
    b = str(tmp_path / "star_vq.safetensors")  # the same tensors nested in a STAR state dict, in bf16
    other = {"llm.model.norm.weight": np.ones(4, np.float32)}
    bf16 = {k: v if v.dtype == np.int64 else v.astype(ml_dtypes.bfloat16) for k, v in second.items()}
    tensor_io.save_safetensors(b, other | {"pixel_encoder." + k: v for k, v in bf16.items()})
    config.train.init_from = (f"vq:{a}",)
    base_before = values(model)["base/stack/layers/mlp/down/kernel"]
    with sharding.use_mesh(mesh, rules):
        init_sources.initialise(model, config, str(tmp_path))
    got = values(model)
    np.testing.assert_array_equal(got["vq/quantize/embedding"], first["quantize.embedding.weight"])
    np.testing.assert_array_equal(
        got["stacked_ar/layers/mlp/down/kernel"], base_before[-config.model.star.stack_layers :]
    )
    with sharding.use_mesh(mesh, rules):  # later sources win
        loaded = init_sources.load_source(model, str(tmp_path), f"vq:{b}")
    assert loaded == {k for k in got if k.startswith("vq/")}
    want = second["quantize.embedding.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.vq.quantize.embedding[...]), want)
    assert_shards_only(model, mesh)
    with pytest.raises(ValueError, match="no VQ tensors"):
        tensor_io.save_safetensors(str(tmp_path / "x.safetensors"), other)
        init_sources.load_source(model, str(tmp_path), f"vq:{tmp_path / 'x.safetensors'}")
    with pytest.raises(ValueError, match=r"expected a stage name, 'stage:<dir>', 'hf:<dir>', 'vq:<file>'"):
        init_sources.load_source(model, str(tmp_path), f"vqx:{a}")


def test_star_file_source_loads_every_part(tmp_path):
    config = tiny_config(ici=(1, 8, 1))
    source, mesh, rules = sharded_model(config, seed=11)
    flat = values(source)
    tensors = {}
    for e in star_table.star_entries(source):
        if e.flax in flat:
            tensors.update(dict(table.to_ref(e, flat[e.flax])))
    tensors["pixel_encoder.quantize.codebook_used"] = np.zeros(65536, np.int64)
    tensors["diffusion_decoder.x.weight"] = np.zeros(2, np.float32)
    path = str(tmp_path / "star.safetensors")
    tensor_io.save_safetensors(path, tensors)
    target, _, _ = sharded_model(config, seed=12)
    with sharding.use_mesh(mesh, rules):
        loaded = init_sources.load_source(target, str(tmp_path), f"star:{path}")
    got = values(target)
    assert loaded == set(got)
    for k in got:
        np.testing.assert_array_equal(got[k], flat[k], err_msg=k)
    assert_shards_only(target, mesh)


def test_hf_config_mismatch_names_every_field(hf_dir, tmp_path):
    path, _ = hf_dir
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    hf_json = hf_config.read_config(path)
    hf_json["text_config"]["rope_parameters"]["rope_theta"] = 10000.0
    hf_json["text_config"]["num_key_value_heads"] = 4
    hf_json["vision_config"]["window_size"] = 112
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(hf_json, f)
    model, mesh, rules = sharded_model(tiny_config(ici=(1, 1, 1)))
    with pytest.raises(ValueError) as e, sharding.use_mesh(mesh, rules):
        init_sources.load_source(model, str(tmp_path), f"hf:{bad}")
    msg = str(e.value)
    for field in ("rope_theta: config 1000000.0", "num_kv_heads: config 2", "vision.window_size: config 56"):
        assert field in msg
    assert "hidden_size" not in msg and "fullatt" not in msg


def published_config(size: str) -> dict:
    """config.json of the published Qwen2.5-VL-3B / -7B-Instruct, from the model cards' values (the
    published shape: text keys at the top level, `rope_scaling`, `vision_config` with `in_chans`)."""
    big = size == "7b"
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 3584 if big else 2048,
        "initializer_range": 0.02,
        "intermediate_size": 18944 if big else 11008,
        "max_position_embeddings": 128000,
        "max_window_layers": 28 if big else 70,
        "num_attention_heads": 28 if big else 16,
        "num_hidden_layers": 28 if big else 36,
        "num_key_value_heads": 4 if big else 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": not big,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584 if big else 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064 if big else 151936,
    }


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_published_qwen25vl_configs_pass_for_their_size(size, tmp_path):
    """The published 3B / 7B config.json pass the hf: check for sizes 3b / 7b (base and ViT), whatever
    order the size table keeps the full-attention blocks in; the other size's fails naming each field."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump(published_config(size), f)
    for stage in ("generation", "understanding"):
        config = star_config.get_config(f"size={size},stage={stage}")
        comps, decoder, vcfg = init_sources.model_configs(config)
        assert init_sources.check_hf_dir(str(tmp_path), comps, decoder, vcfg) == (True, True)
        hf_config.check_star_config(config, str(tmp_path))
    other = star_config.get_config(f"size={'3b' if size == '7b' else '7b'},stage=generation")
    comps, decoder, vcfg = init_sources.model_configs(other)
    with pytest.raises(ValueError) as e:
        init_sources.check_hf_dir(str(tmp_path), comps, decoder, vcfg)
    msg = str(e.value)
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        assert f"; {field}: config" in msg or f"config: {field}: config" in msg, field
    assert "tie_embeddings" in msg and "vision.out_hidden_size" in msg and "head_dim" not in msg
    assert "vision.depth" not in msg and "fullatt" not in msg and "rope_theta" not in msg
    # Order carries no meaning for the full-attention blocks; their set does.
    config = star_config.get_config(f"size={size},stage=generation")
    vcfg = vision.VisionConfig.from_dict(config.model.vision, fullatt_block_indexes=(7, 15, 23))
    decoder = qwen2.DecoderConfig.from_dict(config.model.decoder)
    with pytest.raises(ValueError, match=r"vision\.fullatt_block_indexes: config \(7, 15, 23\)"):
        hf_config.check_hf_config(str(tmp_path), decoder, vcfg)


@pytest.mark.slow
def test_load_workdir_errors_and_success(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(init_sources.WorkdirError, match="nope.*does not exist"):
        init_sources.load_workdir(missing, ("generation",))
    empty = tmp_path / "empty"
    (empty / "generation").mkdir(parents=True)
    (empty / "generation" / "config.json").write_text("{}")  # a config but no checkpoint
    with pytest.raises(init_sources.WorkdirError, match=r"empty'? has no trained editing or generation checkpoint"):
        init_sources.load_workdir(str(empty), ("editing", "generation"))
    # A trained (here: imported) vq stage loads on one device with its saved params.
    config = star_config.get_config("size=tiny,stage=vq,runlocal")
    config.vq_loss.disc_weight = 0.0
    config.mesh.ici = (1, 1, 1)
    model, _, _ = sharded_model(config, seed=21)
    importer.save_stage(model, config, str(tmp_path / "w"))
    loaded, saved_config, stage = init_sources.load_workdir(str(tmp_path / "w"), ("generation", "vq"))
    assert stage == "vq" and saved_config.stage == "vq" and loaded.components == ("vq",)
    want = values(model)
    for k, v in values(loaded).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
