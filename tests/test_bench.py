"""`python -m star_jax.bench train` and `launch/gpu_check.sh`: the PyTorch generation step is the
same model as star_jax's trainer step (equal first loss on the same weights and batch), both
train, and the GPU check runs end to end at tiny sizes on the CPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from star_jax.bench import __main__ as bench_main  # noqa: E402
from star_jax.bench import matmul_floor, torch_reference, torch_train  # noqa: E402
from star_jax.bench import train as bench_train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_torch_step_is_the_trainer_step_in_pytorch():
    config = bench_train.bench_config("tiny", dtype="float32", caption_dropout=0.0)
    batch = bench_train.synthetic_batch(config)
    jax_step = bench_train.JaxStep(config)
    ref = torch_train.trainable_generation_model(jax_step.model)
    del jax_step.model
    base_before = {k: v.clone() for k, v in ref.base.state_dict().items()}
    stack_before = ref.stack.layers[0].mlp.up_proj.weight.detach().clone()
    previous = torch_reference.set_num_threads(1)
    try:
        torch_step = torch_train.TrainStep(ref, config.train, dtype="float32", caption_dropout=0.0)
        tb = torch_train.to_torch_batch(batch)
        jb = jax_step.put(batch)
        jax_losses = [jax_step(jb) for _ in range(4)]
        torch_losses = [torch_step(tb) for _ in range(4)]
    finally:
        torch_reference.set_num_threads(previous)
    # Same weights, same batch, no caption dropout: the same loss before any update.
    np.testing.assert_allclose(torch_losses[0], jax_losses[0], rtol=1e-5)
    # Both train (the learning rate warms up over one step), and torch's base stays frozen.
    assert jax_losses[-1] < jax_losses[0] and torch_losses[-1] < torch_losses[0]
    for k, v in ref.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert not torch.equal(ref.stack.layers[0].mlp.up_proj.weight, stack_before)
    trainable = {id(p) for p in torch_train.trainable_parameters(ref)}
    assert all(id(p) not in trainable for p in ref.base.parameters())
    assert sum(p.numel() for p in torch_train.trainable_parameters(ref)) == jax_step.trainable


def test_step_flops_count_frozen_base_twice_and_the_rest_three_times():
    config = bench_train.bench_config("115m")
    assert 110e6 < bench_train.lm_params(config) < 120e6
    assert 1.5e6 < bench_train.lm_params(bench_train.bench_config("small")) < 2.5e6
    full = bench_train.step_flops(config)
    config.model.star.stack_layers = 0
    no_stack = bench_train.step_flops(config)
    assert 0 < no_stack < full


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--sizes", "small,huge"], "--sizes: 'huge' is not one of tiny, small, 115m, 1b"),
        (["train", "--torch_threads", "1,x"], "--torch_threads='1,x' must be positive integers"),
        (["train", "--repeats", "0"], "--repeats=0 must be >= 1"),
        (["generate", "--torch_threads", "0"], "--torch_threads='0' must be positive integers"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(bench_main.main(["star-jax bench", *args]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.slow
def test_gpu_check_runs_at_tiny_sizes():
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "gpu_check.sh"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    train_row = next(line for line in lines if line.startswith("tiny ") and "x 80" in line)
    # star_jax tok/s, torch tok/s (1 thread) and the speed-up are printed as numbers
    fields = train_row.split()
    assert float(fields[6]) > 0 and float(fields[7]) > 0 and fields[8] == "1" and fields[9].endswith("x")
    assert any(line.startswith("tiny ") and "img/s" not in line and len(line.split()) >= 9 for line in lines[-6:])
    assert "gpu_check: done" in proc.stdout


def test_matmul_floor_finds_every_matmul_with_its_shapes_and_flops():
    """Three matmuls of a jitted function (one batched, one inside an elementwise chain, one
    repeated through an unrolled loop) are found in its optimised HLO with their occurrences."""

    def fn(a, b, c, q, k):
        h = jnp.tanh(jnp.dot(a, b, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)[:, :32]
        for _ in range(2):
            h = (jnp.dot(h, c, preferred_element_type=jnp.float32) + 1).astype(jnp.bfloat16)
        s = jnp.einsum("bqd,bkd->bqk", q, k, preferred_element_type=jnp.float32)
        return h, s

    args = (
        jnp.ones((16, 32), jnp.bfloat16),
        jnp.ones((32, 48), jnp.bfloat16),
        jnp.ones((32, 32), jnp.bfloat16),
        jnp.ones((3, 8, 4), jnp.float32),
        jnp.ones((3, 5, 4), jnp.float32),
    )
    dots = matmul_floor.hlo_dots(jax.jit(fn).lower(*args).compile().as_text())
    flops = sorted((d.flops, n) for d, n in dots.items())
    assert sum(n for _, n in flops) == 4
    total = sum(f * n for f, n in flops)
    assert total == 2 * 16 * 32 * 48 + 2 * (2 * 16 * 32 * 32) + 2 * 3 * 8 * 5 * 4
    floor = matmul_floor.matmul_floor(jax.jit(fn).lower(*args).compile().as_text(), repeats=1)
    assert floor.flops == total and floor.seconds > 0 and len(floor.rows) == len(dots)
