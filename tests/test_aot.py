"""`star-jax aot`: slice names, the abstract batch against real batches, the mesh checks, the
batch search, and real XLA:TPU compiles of the tiny config (skipped, saying why, when the libtpu
wheel is not installed: `pip install -e .[aot]`)."""

import importlib
import json
import re

import numpy as np
import pytest

from star_jax.aot import compile as aot_compile
from star_jax.aot import topology
from star_jax.cli import aot as aot_cli
from star_jax.input import pipeline, signature

star_config = importlib.import_module("star_jax.configs.star")

needs_libtpu = pytest.mark.skipif(
    not topology.libtpu_available(),
    reason="the libtpu wheel is not installed (pip install -e .[aot]): no compile-only TPU devices",
)
GIB = 2**30


def tiny(stage="generation", **overrides):
    config = star_config.get_config(f"size=tiny,stage={stage}")
    config.train.batch_size = 8
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, topology_name, chips, devices, host, wrap",
    [
        ("v5p-8", "v5p:2x2x1", 4, 4, (2, 2, 1), (False,) * 3),
        ("v5p-128", "v5p:4x4x4", 64, 64, (2, 2, 1), (True,) * 3),
        ("v4-32", "v4:2x2x4", 16, 16, (2, 2, 1), (False,) * 3),
        ("v5e-1", "v5e:1x1", 1, 1, (1, 1, 1), (False,) * 3),
        ("v5litepod-256", "v5e:16x16", 256, 256, (2, 2, 1), (True, True, False)),
        ("v6e-64", "v6e:8x8", 64, 64, (2, 2, 1), (False,) * 3),
        ("v6e-128", "v6e:8x16", 128, 128, (2, 2, 1), (False, True, False)),
        ("tpu7x-8", "tpu7x:2x2x1", 4, 8, (2, 2, 1), (False,) * 3),
    ],
)
def test_slice_names_map_like_cloud_tpu(name, topology_name, chips, devices, host, wrap):
    tpu = topology.get(name)
    assert (tpu.topology_name, tpu.chips, tpu.num_devices) == (topology_name, chips, devices)
    assert (tpu.chips_per_host_bounds, tpu.wrap) == (host, wrap)
    assert name.replace("v5litepod", "v5e") in topology.known_names()


@pytest.mark.parametrize(
    "name, listed",
    [
        ("v5p-100", "v5p-8, v5p-16"),
        ("v5p-9", "v5p-128"),
        ("v6e-512", "v6e-256"),
        ("h100-8", "v5e-1"),
        ("v5p", "v6e-64"),
    ],
)
def test_unknown_slice_names_list_the_known_ones(name, listed):
    with pytest.raises(topology.TopologyError, match=rf"^--topology='{name}'.*; known: .*{listed}"):
        topology.get(name)


# -- the abstract batch ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["vq", "understanding", "generation", "editing"])
def test_signature_matches_a_real_batch(stage):
    config = tiny(stage, **{"train.batch_size": 4})
    real = next(pipeline.make_iterator(config, split="train"))
    abstract = signature.batch_signature(config)
    assert sorted(real) == sorted(abstract)
    for key, value in real.items():
        assert (value.shape, np.dtype(value.dtype)) == (abstract[key].shape, np.dtype(abstract[key].dtype)), key


def test_signature_of_pretokenized_editing_carries_codes():
    config = tiny("editing", **{"data.pretokenized": True})
    sig = signature.example_signature(config)
    n = signature.examples.ExampleSpec.from_config(config, signature.stages.get("editing")).num_codes
    assert sig["codes"] == ((n,), np.int32) and sig["src_codes"] == ((n,), np.int32)
    assert "images" not in sig and "src_images" not in sig


# -- the mesh against the slice ------------------------------------------------------------------


def test_mesh_fills_and_checks_against_the_slice():
    v5p8 = topology.get("v5p-8")
    assert aot_compile.mesh_shapes(tiny(), v5p8, 1) == ((4, 1, 1), (1, 1, 1))
    two = tiny(**{"mesh.ici": (1, -1, 1), "mesh.dcn": (2, 1, 1)})
    assert aot_compile.mesh_shapes(two, v5p8, 2) == ((1, 4, 1), (2, 1, 1))
    with pytest.raises(aot_compile.AotError, match=r"config.mesh.ici=\(3, 1, 1\) covers 3 devices, but .* v5p-8 .* 4"):
        aot_compile.mesh_shapes(tiny(**{"mesh.ici": (3, 1, 1)}), v5p8, 1)
    with pytest.raises(
        aot_compile.AotError,
        match=r"mesh.dcn=\(1, 1, 1\) spans 1 slices, but --num_slices=2 \(e.g. --config.mesh.dcn=2,1,1\)",
    ):
        aot_compile.mesh_shapes(tiny(), v5p8, 2)
    with pytest.raises(aot_compile.AotError, match=r"axis 'tensor' cannot span slices"):
        aot_compile.mesh_shapes(tiny(**{"mesh.ici": (4, 1, 1), "mesh.dcn": (1, 1, 2)}), v5p8, 2)


# -- the batch search ------------------------------------------------------------------------------


@pytest.mark.parametrize("largest, step, limit", [(0, 1, 64), (1, 1, 64), (13, 1, 64), (48, 4, 256), (64, 1, 64)])
def test_largest_fitting_batch_is_found_with_few_compiles(largest, step, limit):
    asked = []

    def fits(b):
        asked.append(b)
        return b <= largest

    found = aot_compile.largest_fitting(fits, 0, step, limit)
    assert found == largest // step * step
    assert len(asked) == len(set(asked)) and len(asked) <= 2 * max(1, np.log2(limit)) + 1
    assert all(b % step == 0 and b <= limit for b in asked)


def fake_compiler(monkeypatch, limits: dict[str, int]) -> list:
    """Replaces the compiler: a per-device batch fits when it is at most limits[remat policy]."""
    compiled = []

    def fake_compile(config, tpu, num_slices, mfu):
        b = config.train.batch_size // 4  # v5p-8: data x fsdp = 4
        policy = config.model.decoder.remat_policy
        compiled.append((policy, b))
        fits = b <= limits[policy]
        gib = 2**30
        return aot_compile.AotResult(
            **dict(topology="v5p-8", num_slices=1, num_devices=4, mesh={"data": 4, "fsdp": 1, "tensor": 1}),
            **dict(batch_size=b * 4, per_device_batch=b, grad_accum=1, remat_policy=policy, scan_layers=True),
            **dict(fits=fits, hbm_bytes=95 * gib, peak_bytes=b * gib, argument_bytes=gib, output_bytes=gib),
            **dict(alias_bytes=gib, temp_bytes=(b - 1) * gib, code_bytes=0, compiler_message=None if fits else "OOM"),
        )

    monkeypatch.setattr(aot_compile, "compile_step", fake_compile)
    return compiled


def test_search_starts_each_policy_from_the_previous_one(monkeypatch):
    limits = {"none": 3, "dots": 3, "dots_no_batch": 6, "full": 12}
    compiled = fake_compiler(monkeypatch, limits)
    found = aot_compile.search(tiny(), topology.get("v5p-8"), max_per_device_batch=64)
    assert found.per_policy == limits
    assert found.best_policy == "full" and found.best.per_device_batch == 12
    assert ("dots_no_batch", 1) not in compiled  # started from the 3 that "dots" reached


def test_search_prefers_less_recompute_at_the_same_batch(monkeypatch, capsys, tmp_path):
    fake_compiler(monkeypatch, {"none": 2, "dots": 5, "dots_no_batch": 5, "full": 5})
    out_json = tmp_path / "search.json"
    code, out, err = run_cli(
        capsys,
        "--config=configs/star.py:size=tiny,stage=generation",
        "--topology=v5p-8",
        "--search",
        f"--json={out_json}",
    )
    assert code == 0, err
    assert "largest per-device batch that fits: none 2, dots 5, dots_no_batch 5, full 5" in out
    assert "best: remat dots" in out and "5 per device" in out
    saved = json.loads(out_json.read_text())
    assert saved["search"]["best_policy"] == "dots" and saved["per_device_batch"] == 5 and saved["fits"]


def test_search_with_nothing_fitting_exits_1(monkeypatch, capsys):
    fake_compiler(monkeypatch, dict.fromkeys(aot_compile.REMAT_POLICIES, 0))
    code, out, _ = run_cli(
        capsys, "--config=configs/star.py:size=tiny,stage=generation", "--topology=v5p-8", "--search"
    )
    assert code == 1 and "nothing fits on v5p-8, not even 1 per device with remat full" in out


# -- the command line ----------------------------------------------------------------------------


def run_cli(capsys, *args):
    code = aot_cli.main(["star-jax aot", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_libtpu
@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology=v5p-7"], r"--topology='v5p-7': no v5p slice of that size; known: v5p-8, v5p-16"),
        (["--topology=gpu-8"], r"--topology='gpu-8' is not a TPU slice name; known: v4-8"),
        (["--topology=v5p-8", "--config.mesh.ici=3,1,1"], r"config.mesh.ici=\(3, 1, 1\) covers 3 devices"),
        (["--topology=v5p-8", "--config.train.batch_size=6"], r"train.batch_size.*6.*not divisible by data x fsdp = 4"),
        (
            ["--topology=v5p-8", "--num_slices=2"],
            r"dcn=\(1, 1, 1\) spans 1 slices, but --num_slices=2 \(e.g. --config.mesh.dcn=2,1,1\)",
        ),
        (["--topology=v5p-8", "--num_slices=0"], r"--num_slices=0 must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, "--config=configs/star.py:size=tiny,stage=generation", *args)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("star-jax aot:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err


@needs_libtpu
@pytest.mark.slow  # one XLA:TPU compile of the tiny step: ~15-45 s on 2 cores
def test_tiny_step_compiles_for_v5p_8():
    result = aot_compile.compile_step(tiny(**{"mesh.ici": (1, -1, 1)}), topology.get("v5p-8"))
    assert result.fits and result.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert 90 * GIB < result.hbm_bytes < 100 * GIB  # the compiler's own figure for a v5p chip
    assert 0 < result.argument_bytes and 0 < result.temp_bytes
    expected = result.argument_bytes + result.output_bytes - result.alias_bytes + result.temp_bytes
    assert result.parts_bytes == expected + result.code_bytes < result.hbm_bytes
    # the compiler's peak (buffer liveness) holds at least the arguments and at most the parts
    assert result.argument_bytes <= result.peak_bytes <= result.parts_bytes
    assert result.alias_bytes > 0  # params / optimizer state are donated, as in the trainer
    assert result.flops_compiled > 0 and result.flops_analytic > 0
    assert result.step_time_s == pytest.approx(result.flops_analytic / (4 * 459e12 * 0.5))
    assert result.tokens_per_s == pytest.approx(8 * (320 + 64) / result.step_time_s)


@needs_libtpu
@pytest.mark.slow  # one XLA:TPU compile of the tiny step: ~15-45 s on 2 cores
def test_tiny_step_compiles_for_two_slices_of_v5p_8(capsys, tmp_path):
    out_json = tmp_path / "two.json"
    code, out, err = run_cli(
        capsys,
        "--config=configs/star.py:size=tiny,stage=generation",
        "--config.train.batch_size=8",
        "--config.mesh.ici=1,-1,1",
        "--config.mesh.dcn=2,1,1",
        "--topology=v5p-8",
        "--num_slices=2",
        f"--json={out_json}",
    )
    assert code == 0, err
    assert "on v5p-8, 2 slices: 8 devices, mesh data x fsdp x tensor = 2x4x1" in out and ": fits" in out
    saved = json.loads(out_json.read_text())
    assert saved["fits"] and saved["num_slices"] == 2 and saved["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert saved["per_device_batch"] == 1 and saved["stage"] == "generation"


@needs_libtpu
@pytest.mark.slow  # one XLA:TPU compile of the tiny step: ~15-45 s on 2 cores
def test_oversized_step_does_not_fit_and_exits_1(capsys, tmp_path):
    # 16,384 images per device through the VQ encoder: far beyond a v5e chip's 16 GiB.
    out_json = tmp_path / "big.json"
    code, out, err = run_cli(
        capsys,
        "--config=configs/star.py:size=tiny,stage=generation",
        "--config.train.batch_size=16384",
        "--topology=v5e-1",
        f"--json={out_json}",
    )
    assert code == 1, err
    assert re.search(r"does NOT fit: needs at least [\d.]+ GiB \(temporaries [\d.]+ GiB \+ arguments", out)
    assert "of 15.75 GiB HBM per device, " in out and " GiB over" in out
    assert "compiler: RESOURCE_EXHAUSTED" in out and "exceeds available HBM (15.75G)" in out
    saved = json.loads(out_json.read_text())
    assert not saved["fits"] and saved["over_bytes"] > 0 and saved["peak_bytes"] > saved["hbm_bytes"]
    assert saved["peak_bytes"] == saved["temp_bytes"] + saved["argument_bytes"] and saved["argument_bytes"] > 0


def test_table_writes_markdown_and_json_row_by_row(monkeypatch, capsys, tmp_path):
    fake_compiler(monkeypatch, dict.fromkeys(aot_compile.REMAT_POLICIES, 32))  # tiny: 256 rows = 64 per device
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    code, out, err = run_cli(
        capsys,
        "--table",
        "--table_sizes=tiny",
        "--table_stages=generation,editing",
        "--table_topologies=v5p-8",
        f"--markdown={md}",
        f"--json={js}",
    )
    assert code == 1, err  # a row that does not fit
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| size | stage | slice | mesh (data x fsdp x tensor) | batch per device")
    assert lines[2] == "| tiny | generation | v5p-8 | 4x1x1 | 64 | ≥ 64.0 / 95.0 | no | - | - |"
    assert lines[3].startswith("| tiny | editing | v5p-8 |") and len(lines) == 4
    assert [e["stage"] for e in json.loads(js.read_text())] == ["generation", "editing"]
