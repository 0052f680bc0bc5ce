"""StageCheckpoints: a reader (inference, eval, the next stage) opened while a stage is saving must
not touch the save in flight."""

import glob
import os

import jax.numpy as jnp
import numpy as np

from star_jax import checkpointing


def test_reader_opened_during_an_async_save_leaves_it_intact(tmp_path):
    workdir = str(tmp_path)
    writer = checkpointing.StageCheckpoints(workdir, "vision", keep_last=1)
    state = {"params": {"w": jnp.arange(2_000_000, dtype=jnp.float32).reshape(1000, 2000)}}
    writer.save(7, state, force=True)
    in_flight = glob.glob(os.path.join(workdir, "vision", "ckpt", "*orbax-checkpoint-tmp*"))
    reader = checkpointing.StageCheckpoints(workdir, "vision", read_only=True)  # e.g. `star-jax eval qa`
    reader.close()
    writer.close()
    assert in_flight, "the save finished before the reader opened: the test checks nothing"
    again = checkpointing.StageCheckpoints(workdir, "vision", read_only=True)
    assert again.latest_step() == 7
    np.testing.assert_array_equal(np.asarray(again.read_state(7)["params"]["w"]), np.asarray(state["params"]["w"]))
    again.close()


def test_read_only_checkpoints_of_a_missing_stage_create_nothing(tmp_path):
    reader = checkpointing.StageCheckpoints(str(tmp_path), "generation", read_only=True)
    assert reader.latest_step() is None
    reader.close()
    assert not os.path.exists(os.path.join(tmp_path, "generation"))
