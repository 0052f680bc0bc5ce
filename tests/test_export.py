"""Export of a stage checkpoint: star_jax -> export -> import bit-exact (fp32, bf16), the HF directory
loads in transformers with matching logits, the stack matches transformers decoder layers, layer order."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from star_jax import sharding
from star_jax.configs import star as star_config
from star_jax.convert import export, importer, star_table, verify
from star_jax.convert.stage_reader import build_star, restore_stage_params
from star_jax.convert.tensor_io import SafetensorsFile, TensorDirectory
from star_jax.models import star


def tiny_config(param_dtype: str = "float32"):
    config = star_config.get_config("size=tiny,stage=generation")
    config.model.decoder.dtype = "float32"
    config.model.decoder.param_dtype = param_dtype
    config.model.vq.param_dtype = param_dtype
    return config


def random_model(config, seed: int = 0) -> star.Star:
    """The tiny STAR with every variable random (norm scales around 1), so layouts cannot hide.

    Built abstractly and filled from numpy: much faster on CPU than running the initialisers."""
    mesh, rules = _mesh()
    with sharding.use_mesh(mesh, rules):
        graphdef, state = nnx.get_abstract_model(lambda: build_star(config, rngs=nnx.Rngs(seed)), mesh)
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(state):
        a = var.get_value()
        if path[-1] == "codebook_used":  # code indices, -1 = empty
            value = rng.randint(-1, config.model.vq.codebook_size, a.shape).astype(np.float32)
        else:
            value = 0.1 * rng.randn(*a.shape) + (1.0 if path[-1] == "scale" else 0.0)
        var.set_value(jax.device_put(np.asarray(value).astype(a.dtype), a.sharding))
    return nnx.merge(graphdef, state)


def _mesh():
    return sharding.single_device_mesh(), sharding.DEFAULT_RULES


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def stage(request, tmp_path_factory):
    """A generation stage checkpoint of a random tiny STAR, and its star-format export."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    config = tiny_config(request.param)
    model = random_model(config)
    importer.save_stage(model, config, str(root / "src"))
    out = str(root / "star")
    summary = export.export_star(str(root / "src"), "generation", out)
    return root, config, model, out, summary


def test_round_trip_bit_exact(stage):
    root, config, _, out, _ = stage
    importer.import_star(config, str(root / "dst"), star_path=os.path.join(out, "star.safetensors"))
    src = restore_stage_params(str(root / "src"), "generation")
    dst = restore_stage_params(str(root / "dst"), "generation")
    assert set(src) == set(dst) and len(src) > 200
    for path, value in src.items():
        assert dst[path].dtype == value.dtype, path
        np.testing.assert_array_equal(dst[path].view(np.uint8), value.view(np.uint8), err_msg=path)
    want = np.dtype(jax.numpy.dtype(config.model.decoder.param_dtype))
    assert sum(v.dtype == want for v in src.values()) > 0.9 * len(src)  # the run really is fp32 / bf16


def test_star_file_names_and_layer_order(stage):
    _, config, model, out, summary = stage
    st = SafetensorsFile(os.path.join(out, "star.safetensors"))
    names = list(st)
    assert summary["tensors"] == len(names)
    assert {n.split(".")[0] for n in names} == {
        "llm",
        "stacked_ar",
        "pixel_adapter",
        "pixel_output_head",
        "pixel_encoder",
    }
    layers = [int(n.split(".")[3]) for n in names if n.startswith("stacked_ar.model.layers.") and "q_proj.weight" in n]
    assert layers == list(range(config.model.star.stack_layers))  # scanned layers unstack in order
    base = [int(n.split(".")[3]) for n in names if n.startswith("llm.model.layers.") and n.endswith("up_proj.weight")]
    assert base == list(range(config.model.decoder.num_layers))
    # Layer i of the file is slice i of the stacked star_jax param (torch layout: (out, in)).
    up = np.asarray(model.stacked_ar.layers.mlp.up.kernel[...])
    np.testing.assert_array_equal(np.asarray(st["stacked_ar.model.layers.1.mlp.up_proj.weight"]), up[1].T)
    assert st.shape("pixel_output_head.weight") == (config.model.vq.codebook_size, config.model.decoder.hidden_size)
    assert "pixel_adapter.layers.2.weight" in st and "pixel_encoder.quantize.codebook_used" in st


def test_pt_state_dict(tmp_path, stage):
    root, _, _, out, _ = stage
    summary = export.export_star(str(root / "src"), "generation", str(tmp_path), write_pt=True)
    import torch

    state = torch.load(summary["files"][1], weights_only=True)["state_dict"]
    st = SafetensorsFile(summary["files"][0])
    name = "llm.model.layers.0.self_attn.q_proj.weight"
    want = np.asarray(st[name])
    got = state[name].float().numpy()
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert set(state) == set(st)


def test_hf_export_loads_in_transformers(tmp_path, stage):
    root, config, model, out, _ = stage
    if config.model.decoder.param_dtype != "float32":
        pytest.skip("logit parity is checked in fp32")
    hf_dir = str(tmp_path / "hf")
    summary = export.export_hf(str(root / "src"), "generation", hf_dir, max_shard_bytes=200_000)
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    assert len([f for f in summary["files"] if f.endswith(".safetensors")]) > 1
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    names = list(TensorDirectory(hf_dir))
    assert not any(n.startswith("llm.") for n in names) and "visual.patch_embed.proj.weight" in names
    diffs = verify.compare(model, hf_dir=hf_dir, tensors=SafetensorsFile(os.path.join(out, "star.safetensors")))
    print("verify:", diffs)
    assert diffs["hf_text_logits"] < 1e-4
    assert diffs["stack_hidden"] < 1e-4 and diffs["image_logits"] < 1e-4


def test_star_entries_cover_the_model(stage):
    _, _, model, _, _ = stage
    entries = star_table.star_entries(model)
    flat = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert {e.flax for e in entries} == flat
    assert len({e.ref for e in entries}) == len(entries)


def test_hf_export_untied_qwen2(tmp_path):
    """An untied base exported as a text-only Qwen2 directory (lm_head written) matches transformers."""
    config = tiny_config()
    config.model.decoder.tie_embeddings = False
    model = random_model(config, seed=3)
    importer.save_stage(model, config, str(tmp_path / "src"))
    hf_dir = str(tmp_path / "hf")
    export.export_hf(str(tmp_path / "src"), "generation", hf_dir, with_vision=False)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and not cfg["tie_word_embeddings"]
    assert "lm_head.weight" in SafetensorsFile(os.path.join(hf_dir, "model.safetensors"))
    diffs = verify.compare(model, hf_dir=hf_dir)
    assert set(diffs) == {"hf_text_logits"} and diffs["hf_text_logits"] < 1e-4


def test_hf_export_refuses_interleaved_mrope_before_writing(tmp_path):
    """Qwen2.5-VL has no interleaved M-RoPE: the export says so and writes nothing; text-only is fine."""
    config = tiny_config()
    config.model.decoder.mrope_interleaved = True
    importer.save_stage(random_model(config, seed=4), config, str(tmp_path / "src"))
    hf_dir = tmp_path / "hf"
    with pytest.raises(ValueError, match="mrope_interleaved"):
        export.export_hf(str(tmp_path / "src"), "generation", str(hf_dir))
    assert not hf_dir.exists()
    export.export_hf(str(tmp_path / "src"), "generation", str(hf_dir), with_vision=False)
    assert json.load(open(hf_dir / "config.json"))["architectures"] == ["Qwen2ForCausalLM"]
