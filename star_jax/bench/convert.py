"""`python -m star_jax.bench convert [--size 3b] [--dtype bfloat16] [--dir D]`: export / import time
and peak host memory for a STAR size, from abstract-shaped random weights.

Each phase runs in its own subprocess so its peak resident memory (`wait4` ru_maxrss) is its own:
  setup       random weights of the size (abstract model filled from numpy) saved as a stage
  export_star the stage -> star.safetensors (streamed tensor by tensor)
  export_hf   the stage -> Hugging Face directory (2 GB shards + index)
  import      star.safetensors -> a new stage (model placed tensor by tensor, frozen + step 0)
When the size does not fit this host (estimated from MemAvailable), the next smaller size of
`FALLBACK` is used and the reason printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from star_jax import sharding
from star_jax.configs import star as star_config
from star_jax.convert import export, importer
from star_jax.convert.stage_reader import abstract_star, build_star

FALLBACK = ("7b", "3b", "ladder_xl", "ladder_l", "ladder_m", "ladder_s", "ladder_xs", "tiny")


def _config(size: str, dtype: str):
    config = star_config.get_config(f"size={size},stage=generation")
    config.model.decoder.param_dtype = dtype
    config.model.vq.param_dtype = dtype
    return config


def model_bytes(size: str, dtype: str) -> tuple[int, int]:
    """(number of saved elements, bytes) of the size's generation-stage model, from shapes only."""
    state = nnx.state(abstract_star(_config(size, dtype)))
    leaves = [v.get_value() for _, v in nnx.to_flat_state(state)]
    return sum(int(np.prod(a.shape)) for a in leaves), sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _phase_setup(size: str, dtype: str, root: str) -> dict:
    config = _config(size, dtype)
    mesh = sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, state = nnx.get_abstract_model(lambda: build_star(config, rngs=nnx.Rngs(0)), mesh)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(state):
        a = var.get_value()
        value = rng.standard_normal(a.shape, dtype=np.float32) * 0.02
        if path[-1] == "codebook_used":
            value = np.full(a.shape, -1.0, np.float32)
        var.set_value(jax.device_put(value.astype(a.dtype), a.sharding))
        del value
    return importer.save_stage(nnx.merge(graphdef, state), config, os.path.join(root, "src"))


def _phase(name: str, size: str, dtype: str, root: str) -> dict:
    if name == "setup":
        return _phase_setup(size, dtype, root)
    if name == "export_star":
        return export.export_star(os.path.join(root, "src"), "generation", os.path.join(root, "star"))
    if name == "export_hf":
        return export.export_hf(os.path.join(root, "src"), "generation", os.path.join(root, "hf"))
    if name == "import":
        star_file = os.path.join(root, "star", "star.safetensors")
        return importer.import_star(_config(size, dtype), os.path.join(root, "dst"), star_path=star_file)
    raise ValueError(f"unknown phase {name!r}")


def _run_phase(name: str, size: str, dtype: str, root: str) -> tuple[float, float, dict]:
    """(seconds, peak RSS GiB, summary) of one phase in a fresh subprocess."""
    cmd = [sys.executable, "-m", "star_jax.bench.convert", "--phase", name, "--size", size, "--dtype", dtype]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--dir", root], stdout=subprocess.PIPE, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"phase {name} failed (status {status}); output:\n{out}")
    summary = json.loads(out.strip().splitlines()[-1])
    return seconds, usage.ru_maxrss / 1024**2, summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m star_jax.bench convert", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="3b")
    parser.add_argument("--dtype", default="bfloat16", help="param dtype of the random weights")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv[1:])
    if args.phase:  # inside a phase subprocess: run it and print its summary as the last line
        summary = _phase(args.phase, args.size, args.dtype, args.dir)
        print(json.dumps({k: v for k, v in summary.items() if k != "files"}))
        return 0

    size, available = args.size, _available_bytes()
    while True:
        elements, nbytes = model_bytes(size, args.dtype)
        need = 2.5 * nbytes  # import: the placed model + Orbax's write buffers + the trainable optimizer state
        if need < 0.8 * available or size == FALLBACK[-1]:
            break
        smaller = FALLBACK[FALLBACK.index(size) + 1] if size in FALLBACK else FALLBACK[-1]
        print(
            f"size {size}: {nbytes / 1e9:.1f} GB of weights needs ~{need / 1e9:.0f} GB, "
            f"{available / 1e9:.0f} GB available -> {smaller}"
        )
        size = smaller
    root = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
    print(f"size {size}, {args.dtype}: {elements / 1e9:.3f} B elements, {nbytes / 1e9:.2f} GB; scratch {root}")
    print(f"{'phase':<12} {'seconds':>8} {'GB/s':>6} {'peak RSS GiB':>13} {'peak / model':>13}")
    try:
        for name in ("setup", "export_star", "export_hf", "import"):
            seconds, peak, summary = _run_phase(name, size, args.dtype, root)
            moved = summary.get("bytes", nbytes)
            print(
                f"{name:<12} {seconds:8.1f} {moved / 1e9 / seconds:6.2f} {peak:13.2f} {peak * 1024**3 / nbytes:13.2f}"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(["convert"] + sys.argv[1:]))
