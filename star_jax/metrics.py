"""Training metrics: step metrics summed on the devices between log steps, JSONL + TensorBoard
writers, throughput and MFU, a console progress line, and sample image grids.

One writer: in a multi-process run only process 0 writes metrics.jsonl, TensorBoard events, sample
PNGs and the console line; the other processes keep the same accounting and write nothing. Paths go
through `etils.epath`, so the log directory may be a `gs://` URL.

TensorBoard event files are written through `clu.metric_writers` when TensorFlow is installed
(`pip install -e .[tensorboard]`); without it the JSONL log carries the same numbers and a line
says so once, instead of failing.
"""

from __future__ import annotations

import io
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from star_jax import distributed
from star_jax import images as image_lib

# bf16 dense peak FLOP/s per chip, for MFU. CPU (and unknown devices) are measured at start.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def device_peak_flops() -> float:
    """Peak FLOP/s of one device: a table for accelerators, a measured f32 matmul on CPU."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(3):
        f(a).block_until_ready()
    return 3 * 2 * n**3 / (time.perf_counter() - t0)


class Writer:
    """JSONL log, TensorBoard (when available) and the console progress line, written by process 0
    only (`distributed.is_writer`); on other processes every method is a no-op."""

    def __init__(self, logdir: str, *, total_steps: int, stage: str):
        self.logdir = str(logdir)
        self.stage = stage
        self.total_steps = total_steps
        self.active = distributed.is_writer()
        self._jsonl = None
        self._tb = None
        if not self.active:
            return
        epath.Path(self.logdir).mkdir(parents=True, exist_ok=True)
        self._jsonl = (epath.Path(self.logdir) / "metrics.jsonl").open("a")
        try:
            import tensorflow  # noqa: F401
            from clu import metric_writers

            self._tb = metric_writers.create_default_writer(self.logdir)
        except ImportError:
            logging.info("TensorBoard events off: install star_jax[tensorboard]; metrics go to %s", logdir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Appends {"step": step, **values} to metrics.jsonl, TensorBoard and the console."""
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.write_scalars(step, values)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items() if not k.startswith("_"))
        print(f"[{self.stage}] step {step}/{self.total_steps} {shown}", flush=True)

    def images(self, step: int, name: str, grid: np.ndarray) -> str:
        """Writes a uint8 [H, W, 3] grid as `<logdir>/<name>_<step>.png` (and to TensorBoard); returns
        the PNG path (also on processes that write nothing)."""
        path = epath.Path(self.logdir) / f"{name}_{step:07d}.png"
        if not self.active:
            return str(path)
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
        if self._tb is not None:
            self._tb.write_images(step, {name: grid[None]})
        return str(path)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.flush()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles images [N, H, W, 3] (uint8, or float in [-1, 1]) into one uint8 grid."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = image_lib.to_uint8(images)
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return grid


@jax.jit
def _add(total: dict, values: dict) -> dict:
    return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), total, values)


class StepMetrics:
    """Averages the step metrics between two log lines and adds throughput: step time, tokens/s,
    and MFU from analytic FLOPs per step. The sums stay on the devices (`update` only dispatches an
    add), so the loop never waits for a step to finish; `summary` fetches them once per log line."""

    def __init__(self, flops_per_step: float, tokens_per_step: int, peak_flops: float):
        self.flops_per_step = flops_per_step
        self.tokens_per_step = tokens_per_step
        self.peak = peak_flops * jax.device_count()
        self._sum: dict[str, jax.Array] | None = None
        self._steps = 0
        self._t0 = time.perf_counter()

    def update(self, values: dict[str, jax.Array]) -> None:
        """Adds one step's float32 scalars (device arrays; nothing is fetched)."""
        self._sum = values if self._sum is None else _add(self._sum, values)
        self._steps += 1

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` spent between steps (sample grids) out of the step time."""
        self._t0 += seconds

    def summary(self) -> dict[str, float]:
        """The averages since the last summary, plus step_time_s, tokens_per_s and mfu (waits for the
        devices to finish the steps added so far)."""
        sums = jax.device_get(self._sum) if self._sum is not None else {}
        elapsed = time.perf_counter() - self._t0
        out = {k: float(np.float32(v) / np.float32(self._steps)) for k, v in sums.items()}
        if self._steps:
            step_time = elapsed / self._steps
            out["step_time_s"] = step_time
            out["tokens_per_s"] = self.tokens_per_step / step_time
            out["mfu"] = self.flops_per_step / step_time / self.peak
        self._sum, self._steps, self._t0 = None, 0, time.perf_counter()
        return out
