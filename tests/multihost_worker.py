"""One process of the multi-host proof (tests/test_multihost.py): the trainer-test task of
`train_fixtures` run by `train.train_and_evaluate`, started the way `star-jax train` starts.

  python tests/multihost_worker.py WORKDIR NUM_STEPS multi ROWS_DIR
      one of several processes: `distributed.initialize("explicit")` reads JAX_COORDINATOR_ADDRESS,
      JAX_NUM_PROCESSES and JAX_PROCESS_ID; the record indices of every local batch the trainer draws
      are appended to ROWS_DIR/rows_<process>.txt (outside the workdir); env STAR_JAX_TEST_SLOW_DATA_S
      makes each batch take that long to produce
  python tests/multihost_worker.py WORKDIR NUM_STEPS reference
      one process on all its devices, fed the same global batches as 2 processes: each batch is
      process 0's local batch followed by process 1's (the order of their devices in the mesh)

Exits with distributed.PREEMPTED_EXIT_CODE after a preemption save, like `star-jax train`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import train_fixtures

from star_jax import checkpointing, distributed, train

# Seconds each batch takes to produce (a slow input pipeline): long enough steps that a preemption
# notice reaches every process well before the last step.
SLOW_DATA_S = float(os.environ.get("STAR_JAX_TEST_SLOW_DATA_S", "0"))


class Recorded:
    """A Grain iterator that appends the record index of each row it yields to a file (checkpointable)."""

    def __init__(self, parent, path: str):
        self.parent, self.path = parent, path

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.parent)
        time.sleep(SLOW_DATA_S)
        with open(self.path, "a") as f:
            f.writelines(f"{int(i)}\n" for i in np.asarray(batch["index"]))
        return batch

    def get_state(self):
        return self.parent.get_state()

    def set_state(self, state):
        self.parent.set_state(json.loads(state) if isinstance(state, bytes) else state)

    def start_prefetch(self):
        pass


class Concatenated:
    """Batches of `parts` iterators concatenated along the batch axis: what `len(parts)` processes
    feed together as one global batch."""

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {str(i): p.get_state() for i, p in enumerate(self.parts)}

    def set_state(self, state):
        state = json.loads(state) if isinstance(state, bytes) else state
        for i, p in enumerate(self.parts):
            p.set_state(state[str(i)])

    def start_prefetch(self):
        pass


def main(argv: list[str]) -> int:
    workdir, steps, mode = argv[1], int(argv[2]), argv[3]
    cfg = train_fixtures.config(steps)
    cfg.train.ckpt_every = steps  # a save is a few barriers between processes: only the last step's
    task = train_fixtures.task(cfg)
    make = task.make_iterator
    if mode == "multi":
        distributed.initialize("explicit", timeout_s=120)
        rows = os.path.join(argv[4], "rows_{}.txt")
        task.make_iterator = lambda pi, pc: Recorded(make(pi, pc), rows.format(pi))
    else:
        task.make_iterator = lambda pi, pc: Concatenated([make(0, 2), make(1, 2)])
    train.train_and_evaluate(cfg, workdir, task)
    if not checkpointing.is_stage_done(workdir, cfg.stage):
        return distributed.PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
