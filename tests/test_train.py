"""The common trainer: frozen means frozen, exact resume after SIGKILL (also during a save),
restore onto other meshes, SIGTERM, non-finite steps, gradient accumulation."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures
from flax import nnx

from star_jax import checkpointing, distributed, optim, sharding, stages, train, train_step
from star_jax.configs import star
from star_jax.models import qwen2

HERE = os.path.dirname(__file__)


def _losses(workdir: str, stage: str = "understanding") -> dict[int, float]:
    """step -> loss, the last logged value per step (a resumed run re-logs replayed steps)."""
    out = {}
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


def _spawn(workdir, steps, ici="-1,1,1", devices=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(HERE, "train_fixtures.py"), workdir, str(steps), ici]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir, steps, **kw):
    p = _spawn(workdir, steps, **kw)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    _run(workdir, 12)
    return workdir


def test_frozen_params_unchanged_and_without_optimizer_state(tmp_path):
    cfg = train_fixtures.config(num_steps=4)
    task = train_fixtures.task(cfg)
    # The jitted sharded init gives the same values on every mesh (eager init may differ by an ulp).
    model = sharding.create_sharded(task.build_model, sharding.single_device_mesh(), sharding.DEFAULT_RULES)
    initial = nnx.state(model, nnx.Param).to_pure_dict()
    train.train_and_evaluate(cfg, str(tmp_path), task)
    ckpts = checkpointing.StageCheckpoints(str(tmp_path), "understanding")
    state = ckpts.read_state(4)
    trained = checkpointing.flatten(state["params"])
    flat_initial = checkpointing.flatten(initial)
    frozen_paths = {k: v for k, v in flat_initial.items() if k not in trained}
    assert "embedding" in frozen_paths and "stack/layers/input_norm/scale" in frozen_paths
    assert any(not np.array_equal(np.asarray(trained[k]), np.asarray(flat_initial[k])) for k in trained)
    restored_frozen = checkpointing.flatten(ckpts.restore_frozen(checkpointing.unflatten(frozen_paths)))
    for k, v in frozen_paths.items():
        assert np.array_equal(np.asarray(restored_frozen[k]), np.asarray(v)), k  # bit-identical
    # Adam moments exist for trainable params only.
    mu = checkpointing.flatten(state["opt_state"][1][0]["mu"])
    assert set(mu) == set(trained)
    ckpts.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["understanding", "generation"])
def test_footprint_from_abstract_shapes_equals_the_built_model(stage):
    """`star-jax params` (3b / 7b) counts from abstract shapes: on `tiny` its numbers equal those
    of the built model and the optimizer state the trainer creates."""
    cfg = star.get_config(f"size=tiny,stage={stage}")
    got = optim.footprint(cfg)
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        model = stages.build_model(cfg, rngs=nnx.Rngs(cfg.seed))
    _, trainable, frozen, _ = optim.split_trainable(model, list(cfg.train.trainable))
    trainable, frozen = trainable.to_pure_dict(), frozen.to_pure_dict()
    opt_state = optim.make_optimizer(cfg.train).init(trainable)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert got == {
        "total_params": count(trainable) + count(frozen),
        "trainable_params": count(trainable),
        "frozen_params": count(frozen),
        "param_bytes": sum(x.nbytes for x in jax.tree.leaves((trainable, frozen))),
        "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(opt_state)),
    }
    # AdamW's two f32 moments (and a step count) per trainable param; none for frozen ones.
    assert 8 * got["trainable_params"] <= got["optimizer_bytes"] <= 8 * got["trainable_params"] + 64
    assert (got["frozen_params"] > 0) == (stage == "generation")


def test_params_cli_prints_a_row_per_size_and_stage(capsys):
    from star_jax.cli import params

    assert params.main(["star-jax params", "--sizes", "tiny", "--stages", "understanding,generation"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [r.split(" | ")[1] for r in rows] == ["understanding", "generation"]
    assert params.main(["star-jax params", "--sizes", "tiny", "--stages", "pretraining"]) == 2
    assert "--stages 'pretraining' is not a stage" in capsys.readouterr().err


def test_trainable_regex_that_matches_nothing_is_an_error():
    cfg = train_fixtures.config()
    with sharding.use_mesh(sharding.single_device_mesh(), sharding.DEFAULT_RULES):
        model = train_fixtures.task(cfg).build_model()
        with pytest.raises(ValueError, match="matches no parameter"):
            optim.split_trainable(model, [r"^stacked_arr/"])


@pytest.mark.slow
def test_sigkill_at_random_step_resumes_bit_exact(reference_run, tmp_path):
    ref = _losses(reference_run)
    kill_at = random.Random(os.getpid()).randint(4, 10)
    workdir = str(tmp_path)
    p = _spawn(workdir, 12)
    metrics_file = os.path.join(workdir, "understanding", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= kill_at:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    _run(workdir, 12)
    got = _losses(workdir)
    assert sorted(got) == list(range(1, 13))
    assert got == ref  # every step's loss, bit for bit


@pytest.mark.slow
def test_kill_during_a_save_leaves_a_readable_checkpoint(reference_run, tmp_path):
    workdir = str(tmp_path)
    p = _spawn(workdir, 12)
    ckpt_dir = os.path.join(workdir, "understanding", "ckpt")
    killed_in_save = False
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.isdir(ckpt_dir) and any("tmp" in d for d in os.listdir(ckpt_dir)):
            # A step directory is being written (not yet renamed into place): kill now.
            if any(d.isdigit() for d in os.listdir(ckpt_dir)):
                p.send_signal(signal.SIGKILL)
                killed_in_save = True
                break
        time.sleep(0.005)
    p.wait()
    if not killed_in_save:
        pytest.skip("no in-progress save was observed (timing)")
    ckpts = checkpointing.StageCheckpoints(workdir, "understanding")
    latest = ckpts.latest_step()
    assert latest is not None and ckpts.read_state(latest)["step"] == latest
    ckpts.close()
    _run(workdir, 12)
    assert _losses(workdir) == _losses(reference_run)


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes(reference_run, tmp_path):
    saved = str(tmp_path / "saved")
    _run(saved, 6, ici="2,2,2")
    ref = _losses(reference_run)
    for name, ici, devices in (("data8", "8,1,1", 8), ("one", "1,1,1", 1)):
        workdir = str(tmp_path / name)
        shutil.copytree(saved, workdir)
        os.remove(os.path.join(workdir, "understanding", "DONE"))
        _run(workdir, 9, ici=ici, devices=devices)
        got = _losses(workdir)
        for step in (7, 8, 9):
            assert abs(got[step] - ref[step]) < 1e-5, (name, step, got[step], ref[step])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    p = _spawn(workdir, 200)
    metrics_file = os.path.join(workdir, "understanding", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(metrics_file) and len(open(metrics_file).readlines()) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == distributed.PREEMPTED_EXIT_CODE, out
    assert "preempted: saved step" in out
    ckpts = checkpointing.StageCheckpoints(workdir, "understanding")
    assert ckpts.latest_step() == len(open(metrics_file).readlines())
    assert not ckpts.is_done()
    ckpts.close()


def _nan_task(cfg, bad_steps):
    task = train_fixtures.task(cfg)

    def objective(model, batch, rng, step):
        loss, aux = train_fixtures.lm_objective(model, batch, rng, step)
        return jnp.where(jnp.isin(step, jnp.asarray(bad_steps)), jnp.nan, loss), aux

    task.objective = objective
    return task


def test_nonfinite_loss_stops_with_clear_error(tmp_path):
    cfg = train_fixtures.config(num_steps=6)
    with pytest.raises(train.NonFiniteError, match="non-finite loss nan .* at step 2"):
        train.train_and_evaluate(cfg, str(tmp_path), _nan_task(cfg, [2]))


@pytest.mark.slow
def test_nonfinite_steps_skipped_up_to_a_limit(tmp_path):
    cfg = train_fixtures.config(num_steps=6)
    cfg.train.nonfinite = "skip"
    cfg.train.max_skipped_steps = 2
    out = train.train_and_evaluate(cfg, str(tmp_path / "a"), _nan_task(cfg, [1, 3]))
    assert np.isfinite(out["grad_norm"])
    with pytest.raises(train.NonFiniteError, match="skipped 2 before"):
        train.train_and_evaluate(cfg, str(tmp_path / "b"), _nan_task(cfg, [1, 2, 3]))


def test_sample_grids_every_k_steps_and_at_the_last_leave_training_unchanged(tmp_path):
    """The trainer hands the current model to `task.sample` at steps k, 2k, ... and the last one and
    writes each grid as PNG; the losses equal those of a run without samples."""
    from PIL import Image

    cfg = train_fixtures.config(num_steps=5)
    cfg.train.log_every = 1
    seen = []

    def sample(model, step):
        seen.append((step, sum(float(jnp.sum(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))))
        return np.full((6, 10, 3), step, np.uint8)

    plain = train_fixtures.task(cfg)
    train.train_and_evaluate(cfg, str(tmp_path / "plain"), plain)
    cfg.train.sample_every = 2
    sampled = train_fixtures.task(cfg)
    sampled.sample = sample
    train.train_and_evaluate(cfg, str(tmp_path / "sampled"), sampled)
    assert [s for s, _ in seen] == [2, 4, 5]
    assert seen[0][1] != seen[1][1]  # the model as trained so far, not the initial one
    for step in (2, 4, 5):
        grid = np.asarray(Image.open(tmp_path / "sampled" / "understanding" / f"samples_{step:07d}.png"))
        assert grid.shape == (6, 10, 3) and (grid == step).all()
    assert _losses(str(tmp_path / "sampled")) == _losses(str(tmp_path / "plain"))


def test_lr_mults_equal_adamw_at_the_scaled_rate():
    """Each group's update equals a plain AdamW step at lr x its factor (weight decay included)."""
    import ml_collections

    def opt(lr, mults=()):
        c = dict(lr=lr, warmup_steps=0, num_steps=10, schedule="constant", b1=0.9, b2=0.95, weight_decay=0.1)
        return optim.make_optimizer(ml_collections.ConfigDict(c | {"clip_norm": 1.0, "lr_mults": mults}))

    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "vision": {"w": jax.random.normal(keys[0], (4, 3))},
        "stack": {"0": {"w": jax.random.normal(keys[1], (3, 3))}},
    }
    grads = {
        "vision": {"w": jax.random.normal(keys[2], (4, 3))},
        "stack": {"0": {"w": jax.random.normal(keys[3], (3, 3))}},
    }
    tx = opt(1e-2, (("^vision/", 3.0), ("^stack/0/", 0.5)))
    updates, _ = tx.update(grads, tx.init(params), params)
    for group, factor in (("vision", 3.0), ("stack", 0.5)):
        ref = opt(1e-2 * factor)
        expected, _ = ref.update(grads, ref.init(params), params)
        for a, b in zip(jax.tree.leaves(updates[group]), jax.tree.leaves(expected[group])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    with pytest.raises(ValueError, match=r"lr_mults: pattern '\^visoin/' matches no trainable parameter"):
        opt(1e-2, (("^visoin/", 3.0),)).init(params)


def test_decoder_config_roundtrip():
    cfg = train_fixtures.config()
    assert qwen2.DecoderConfig.from_dict(cfg.model.decoder).hidden_size == 64


@pytest.mark.slow
@pytest.mark.parametrize("disc_weight,adaptive", [(0.0, False), (0.5, False), (0.5, True)])
def test_vq_stage_trains_the_patchgan_only_when_weighted(tmp_path, disc_weight, adaptive):
    """The VQ stage of the common trainer: with a GAN weight the discriminator is built, trained
    (its hinge loss logged from `disc_start`) and checkpointed; without one it does not exist."""
    c = star.get_config("size=tiny,stage=vq,runlocal")
    c.model.vq.image_size, c.data.max_prompt_len = 32, 16
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 3, 8, 1, 3
    c.train.warmup_steps = 1
    c.vq_loss.disc_weight, c.vq_loss.disc_start, c.vq_loss.disc_adaptive = disc_weight, 1, adaptive
    c.vq_loss.discriminator.ndf, c.vq_loss.discriminator.norm_groups = 8, 8
    last = train.train_and_evaluate(c, str(tmp_path))
    assert np.isfinite(last["loss"]) and last["psnr"] > 0
    ckpts = checkpointing.StageCheckpoints(str(tmp_path), "vq")
    saved = checkpointing.flatten(ckpts.read_state(ckpts.latest_step()))
    ckpts.close()
    has_disc = any("discriminator" in k for k in saved)
    assert has_disc == (disc_weight > 0)
    if disc_weight:
        assert last["disc"] > 0 and "gen_adv" in last
        assert (last["disc_adaptive_weight"] == 1.0) != adaptive and np.isfinite(last["disc_adaptive_weight"])
    else:
        assert "disc" not in last


def test_gradient_accumulation_on_8_devices_matches_full_batch():
    """Microbatches spread over all 8 data-parallel devices: the trainer's jitted step with 4
    microbatches equals one full batch (loss, gradient norm, updated params within 1e-5)."""
    cfg = train_fixtures.config()
    cfg.train.batch_size = 32  # 4 microbatches of 8 rows: one row per device each
    task = train_fixtures.task(cfg)
    mesh, rules = sharding.make_mesh((8, 1, 1)), sharding.DEFAULT_RULES
    model = sharding.create_sharded(task.build_model, mesh, rules)
    with sharding.use_mesh(mesh, rules):
        graphdef, params, frozen, other = optim.split_trainable(model, list(cfg.train.trainable))
        params, frozen, other = (s.to_pure_dict() for s in (params, frozen, other))
        tx = optim.make_optimizer(cfg.train)
        opt_state = jax.jit(tx.init, out_shardings=train_step.opt_state_shardings(tx, params, mesh))(params)
        ids = next(train_fixtures.make_iterator(32)(0, 1))["ids"]
        batch = train._put_batch({"ids": ids}, mesh, rules, None)
        assert len(batch["ids"].sharding.device_set) == 8
        copy = lambda tree: jax.tree.map(lambda x: jax.device_put(np.asarray(x), x.sharding), tree)  # noqa: E731
        outs = []
        for accum in (1, 4):
            step_fn = train_step.make_train_step(graphdef, task.objective, tx, grad_accum=accum, skip_nonfinite=False)
            state = {"params": copy(params), "opt_state": copy(opt_state), "other": copy(other)}
            jitted = train_step.jit_train_step(step_fn, state, frozen)
            new_params, _, _, m = jitted(
                state["params"], frozen, state["other"], state["opt_state"], batch, jax.random.key(0), jnp.int32(0)
            )
            outs.append((jax.device_get(new_params), jax.device_get(m)))
    assert abs(float(outs[0][1]["loss"]) - float(outs[1][1]["loss"])) <= 1e-5
    assert abs(float(outs[0][1]["grad_norm"]) - float(outs[1][1]["grad_norm"])) <= 1e-5
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


class _SlowData:
    """The fixture's iterator, each batch taking `seconds` longer to produce (a slow input pipeline)."""

    def __init__(self, parent, seconds: float):
        self.parent, self.seconds = parent, seconds

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.seconds)
        return next(self.parent)

    def get_state(self):
        return self.parent.get_state()

    def set_state(self, state):
        self.parent.set_state(state)


def _step_time(tmp_path, name: str, data_seconds: float) -> float:
    """Seconds per step of the training loop, averaged over steps 11-40 (compilation left out)."""
    cfg = train_fixtures.config(num_steps=40)
    cfg.train.log_every, cfg.train.ckpt_every = 10, 1000
    task = train_fixtures.task(cfg)
    make = task.make_iterator
    task.make_iterator = lambda pi, pc: _SlowData(make(pi, pc), data_seconds)
    train.train_and_evaluate(cfg, str(tmp_path / name), task)
    with open(tmp_path / name / "understanding" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return float(np.mean([r["step_time_s"] for r in rows if r["step"] > 10]))


def test_loop_time_per_step_stays_the_device_step_time_when_data_is_slow(tmp_path):
    """The next batch is produced and put on the devices while the current step runs, and the loop
    fetches nothing per step: with data taking 80 % of a step to produce, a loop that waited for its
    data would take ~1.8x the device step time; this one stays close to 1x."""
    device = _step_time(tmp_path, "fast", 0.0)
    slow = _step_time(tmp_path, "slow", 0.8 * device)
    ratio = slow / device
    print(f"device step {device * 1e3:.1f} ms, with data at 80 % of it {slow * 1e3:.1f} ms: ratio {ratio:.3f}")
    assert ratio < 1.4, (device, slow)


def test_saves_by_wall_time_at_log_steps(tmp_path):
    """`config.train.ckpt_every_s`: a save is due at the first log step after that many seconds
    (decided by process 0 for all); here every log step, against only the last step without it."""
    cfg = train_fixtures.config(num_steps=3)
    cfg.train.ckpt_every = 1000
    cfg.train.ckpt_every_s = 1e-9
    train.train_and_evaluate(cfg, str(tmp_path / "timed"), train_fixtures.task(cfg))
    assert checkpointing.complete_steps(str(tmp_path / "timed" / "understanding")) == [1, 2, 3]
    cfg.train.ckpt_every_s = 0
    train.train_and_evaluate(cfg, str(tmp_path / "plain"), train_fixtures.task(cfg))
    assert checkpointing.complete_steps(str(tmp_path / "plain" / "understanding")) == [3]
