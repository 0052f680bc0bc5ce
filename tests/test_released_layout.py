"""Import of STAR weights in the layout they are released in (STAR_SPEC section 8, issue 31 item 8):
a `.pt` holding `{'state_dict': ...}` of bf16 tensors under transformers-4.51 names (`llm.model.*`,
`llm.lm_head.*`, `llm.visual.*`, `stacked_ar.model.*`, `pixel_adapter.layers.*`,
`pixel_output_head.*`) and a VQ `.pt` that is a raw state dict with an int64 `codebook_used`
buffer. Both import with `allow_pickle` alone; newer transformers names (`llm.model.language_model.*`,
`llm.model.visual.*`) too; the result equals, parameter for parameter and in one forward, the import
of the same values from the plain layout (float32 safetensors)."""

import logging

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from test_export import random_model, tiny_config

from star_jax import init_sources
from star_jax import main as star_main
from star_jax.convert import export, importer, verify
from star_jax.convert.stage_reader import restore_stage_params
from star_jax.convert.tensor_io import SafetensorsFile, save_safetensors

VQ = "pixel_encoder."
USAGE = VQ + "quantize.codebook_used"


def _bf16(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, np.float32).astype(ml_dtypes.bfloat16).view(np.int16)).view(
        torch.bfloat16
    )


def _newer_name(name: str) -> str:
    """The name transformers >= 4.52 gives the wrapped Qwen2.5-VL."""
    for released, newer in (("llm.model.", "llm.model.language_model."), ("llm.visual.", "llm.model.visual.")):
        if name.startswith(released):
            return newer + name[len(released) :]
    return name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random tiny STAR written as (a) the released layout: star.pt (bf16, 4.51 names,
    an `llm.lm_head.weight` copy of the tied embedding) + vq.pt (bf16 raw VQ state dict, int64
    usage buffer); (b) the same with newer transformers names; (c) the plain layout: one float32
    safetensors file of the same (bf16-rounded) values."""
    root = tmp_path_factory.mktemp("released")
    config = tiny_config()
    src = str(root / "src")
    importer.save_stage(random_model(config, seed=3), config, src)
    export.export_star(src, "generation", str(root / "star"))
    full = SafetensorsFile(str(root / "star" / "star.safetensors"))
    rounded = {}  # the values a bf16 release holds, as float32
    for name in full:
        value = np.asarray(full[name])
        rounded[name] = value if name == USAGE else value.astype(ml_dtypes.bfloat16).astype(np.float32)
    usage = np.asarray(rounded[USAGE]).astype(np.int64)
    star = {n: _bf16(v) for n, v in rounded.items() if not n.startswith(VQ)}
    star["llm.lm_head.weight"] = star["llm.model.embed_tokens.weight"].clone()  # tied: the release keeps both
    torch.save({"state_dict": star}, root / "star.pt")
    torch.save({"state_dict": {_newer_name(n): v for n, v in star.items()}}, root / "star_newer.pt")
    vq = {n.removeprefix(VQ): _bf16(v) for n, v in rounded.items() if n.startswith(VQ) and n != USAGE}
    vq["quantize.codebook_used"] = torch.from_numpy(usage)
    torch.save(vq, root / "vq.pt")
    save_safetensors(str(root / "plain.safetensors"), rounded)
    return root, config, rounded, usage


def _import(root, config, workdir, star="star.pt", vq="vq.pt", allow_pickle=True):
    summary = importer.import_star(
        config, str(workdir), star_path=str(root / star), vq_path=str(root / vq), allow_pickle=allow_pickle
    )
    return summary, restore_stage_params(str(workdir), "generation")


def test_released_pt_files_import_like_the_plain_layout(files, tmp_path, caplog):
    root, config, rounded, usage = files
    plain = importer.import_star(config, str(tmp_path / "plain"), star_path=str(root / "plain.safetensors"))
    assert plain["tensors"] == len(rounded)
    want = restore_stage_params(str(tmp_path / "plain"), "generation")
    with caplog.at_level(logging.INFO):
        _, got = _import(root, config, tmp_path / "released")
    assert set(got) == set(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    # Against the source tensors themselves: a stacked-AR weight, the head, the ViT, the usage buffer.
    up = rounded["stacked_ar.model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_array_equal(got["stacked_ar/layers/mlp/up/kernel"][1].T, up)
    np.testing.assert_array_equal(got["image_head/bias"], rounded["pixel_output_head.bias"])
    np.testing.assert_array_equal(got["vision/merger/norm/scale"], rounded["llm.visual.merger.ln_q.weight"])
    assert got["vq/quantize/codebook_used"].dtype == np.float32
    np.testing.assert_array_equal(got["vq/quantize/codebook_used"], usage.astype(np.float32))
    # One forward of each imported stage: the same logits.
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % config.model.decoder.vocab_size
    released = verify.load_stage_model(str(tmp_path / "released"), "generation")
    reference = verify.load_stage_model(str(tmp_path / "plain"), "generation")
    np.testing.assert_array_equal(np.asarray(released.base(ids)), np.asarray(reference.base(ids)))


def test_newer_transformers_names_import_the_same(files, tmp_path):
    root, config, _, _ = files
    _, released = _import(root, config, tmp_path / "a")
    _, newer = _import(root, config, tmp_path / "b", star="star_newer.pt")
    assert set(newer) == set(released)
    for path, value in released.items():
        np.testing.assert_array_equal(newer[path], value, err_msg=path)


def test_buffers_the_model_does_not_hold_are_skipped_with_one_line(files, tmp_path, caplog):
    """A usage window of another length (LlamaGen's) and an integer counter: skipped, logged once;
    the model keeps its empty usage window. A float tensor nobody reads is still an error."""
    root, config, _, _ = files
    vq = torch.load(root / "vq.pt", weights_only=True)
    vq["quantize.codebook_used"] = torch.zeros(config.model.vq.codebook_size, dtype=torch.int64)
    vq["quantize.num_updates"] = torch.tensor(7, dtype=torch.int64)
    torch.save(vq, tmp_path / "vq_other.pt")
    with caplog.at_level(logging.INFO, logger="root"):
        _, got = _import(root, config, tmp_path / "w", vq=str(tmp_path / "vq_other.pt"))
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "2 buffer(s)" in lines[0] and "pixel_encoder.quantize.num_updates" in lines[0]
    assert (got["vq/quantize/codebook_used"] == -1).all()
    vq["quantize.stray"] = torch.zeros(3)
    torch.save(vq, tmp_path / "vq_stray.pt")
    with pytest.raises(importer.CheckpointError, match=r"unexpected \(1\): pixel_encoder\.quantize\.stray"):
        _import(root, config, tmp_path / "x", vq=str(tmp_path / "vq_stray.pt"))


def test_cli_imports_the_released_files_with_allow_pickle_alone(files, tmp_path, capsys):
    root, _, _, _ = files
    args = [
        "star-jax",
        "import",
        "--config=configs/star.py:size=tiny,stage=generation",
        "--config.model.decoder.dtype=float32",
        f"--star={root / 'star.pt'}",
        f"--vq={root / 'vq.pt'}",
    ]
    assert star_main.run(args + [f"--workdir={tmp_path / 'a'}"]) == 2
    assert "--allow_pickle" in capsys.readouterr().err
    assert star_main.run(args + [f"--workdir={tmp_path / 'b'}", "--allow_pickle"]) == 0
    assert (tmp_path / "b" / "generation" / "config.json").exists()


def test_star_init_source_reads_released_and_newer_names(files):
    """`init_from=("star:<file>", "vq:<file>")` reads the released files (the VQ shipped apart), and a
    star file with newer transformers names the same; star: alone, without a VQ, is refused."""
    root, config, _, _ = files
    loaded = []
    for name in ("star.pt", "star_newer.pt"):
        cfg = config.copy_and_resolve_references()
        cfg.train.init_from = (f"star:{root / name}", f"vq:{root / 'vq.pt'}")
        model = random_model(cfg, seed=7)
        paths = init_sources.initialise(model, cfg, "")
        assert any(p.startswith("vq/") for p in paths) and any(p.startswith("stacked_ar/") for p in paths)
        loaded.append({"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})
    assert loaded[0].keys() == loaded[1].keys()
    for path, value in loaded[0].items():
        np.testing.assert_array_equal(loaded[1][path], value, err_msg=path)
    cfg = config.copy_and_resolve_references()
    cfg.train.init_from = (f"star:{root / 'star.pt'}",)
    with pytest.raises(init_sources.SourceError, match="holds no VQ"):
        init_sources.initialise(random_model(cfg, seed=7), cfg, "")
