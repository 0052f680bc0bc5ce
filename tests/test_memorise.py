"""Every stage learns what it should (issue 31): trained from random weights on 16 fixed shapes-world
examples, greedy decoding reproduces >= 15 of the 16 targets exactly (generation / editing: every VQ
code of the image; understanding: the answer), and swapping two inputs swaps their outputs.

Each runs `python -m star_jax.projects.shapes.memorise` in a subprocess on one CPU device (the
command a user runs; the test session simulates 8 devices, which would split the batch of 16)."""

import json
import os
import subprocess
import sys

import pytest

from star_jax import stages
from star_jax.input import sources
from star_jax.projects.shapes import memorise


def _memorise(stage: str, workdir: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    cmd = [sys.executable, "-m", "star_jax.projects.shapes.memorise", "--stage", stage, "--workdir", workdir]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(os.path.join(workdir, f"memorise_{stage}.json")) as f:
        result = json.load(f)
    print(json.dumps(result))
    return result


@pytest.mark.slow
@pytest.mark.parametrize("stage", memorise.STAGES)
def test_stage_memorises_16_examples(stage, tmp_path):
    result = _memorise(stage, str(tmp_path))
    assert result["steps"] == memorise.DEFAULT_STEPS[stage]
    assert result["of"] == 16
    assert result["reproduced"] >= 15, result
    assert result["swap_ok"], result


def test_the_16_examples_have_distinct_texts():
    for stage in memorise.STAGES:
        config = memorise.memorise_config(stage, steps=1, lr=1e-3)
        record = stages.for_config(config)
        source, _ = sources.make_source(config, "train", record)
        field = memorise.TEXT_FIELD[record.reads]
        texts = [source[i][field] for i in range(len(source))]
        assert len(source) == config.data.num_train_examples == 16
        assert len(set(texts)) == 16, texts
