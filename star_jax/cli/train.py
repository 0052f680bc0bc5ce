"""`star-jax train --config configs/star.py:size=..,stage=.. --workdir W`: one stage, resumable.

The config is checked before anything is built or written (sizes, stage, prompt lengths, and the
init sources a fresh run reads: earlier stages' checkpoints, `hf:` / `vq:` / `star:` / `stage:`
paths, an `hf:` directory's config.json); a mistake is one line on stderr, exit 2. The log
(library messages included) goes to W/star_jax.log (process k > 0 of a multi-process run:
W/star_jax.process_<k>.log).

Multi-process (a TPU pod, a GPU cluster): the same command on every host with
`--config.distributed.mode=auto` (TPU VM metadata, Slurm, Open MPI) or `=explicit` (env
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). On SIGTERM (or a TPU maintenance
notice) every process saves the same step and the command exits with status 42
(`distributed.PREEMPTED_EXIT_CODE`): rerun it to resume.
"""

from __future__ import annotations

import os

import jax

from star_jax import checkpointing, distributed, init_sources, records, train
from star_jax.cli import common
from star_jax.configs import validation

USAGE = "--config configs/star.py:size=tiny,stage=understanding --workdir DIR are required"


def main(argv: list[str]) -> int:
    fv = common.parse(argv, doc=__doc__)  # starts the distributed runtime (config.distributed)
    prog = argv[0]
    if fv.config is None or fv.workdir is None:
        common.usage_error(prog, USAGE)
    config = fv.config
    try:
        validation.validate(config, num_devices=jax.device_count())
        distributed.check_run(config, fv.workdir)
        init_sources.check_start(config, fv.workdir)  # before the log file: a refused start writes nothing
    except ValueError as e:
        return common.error(prog, e)
    name = "star_jax.log" if distributed.is_writer() else f"star_jax.process_{jax.process_index()}.log"
    common.log_to(os.path.join(fv.workdir, name))
    try:
        out = train.train_and_evaluate(config, fv.workdir)
    except (ValueError, records.BadDataError) as e:  # the mesh for these devices; sources; bad data
        return common.error(prog, e)
    if not checkpointing.is_stage_done(fv.workdir, config.stage):  # stopped by a preemption save
        return distributed.PREEMPTED_EXIT_CODE
    if distributed.is_writer():
        print({k: round(v, 5) for k, v in out.items()})
    return 0
