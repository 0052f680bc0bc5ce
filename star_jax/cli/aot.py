"""`star-jax aot --config configs/star.py:size=7b,stage=generation --topology v5p-128`: compile the
trainer's step for a TPU slice on this machine (no TPU needed) and say whether it fits.

Reports per device: arguments, outputs, temporaries, peak and the compiler's HBM; FLOPs per step
from the compiler beside the analytic count; the step time and tokens / s at --mfu of the chip's
bf16 peak. Exit 0 when it fits, 1 when it does not (with the compiler's own RESOURCE_EXHAUSTED
line and the shortfall), 2 on a bad input (unknown slice, a mesh that does not match the slice,
a batch that does not divide): one line naming the setting.

  --num_slices N  N slices joined over DCN (config.mesh.dcn spans them: data / fsdp only)
  --search        the largest per-device batch that fits, per remat policy
                  (config.model.decoder.remat_policy: none | dots | dots_no_batch | full)
  --table         the README table: sizes x stages x slices (--table_* flags), FSDP over each slice
  --json F        writes the result(s) as JSON (--table: also --markdown F)

Needs the libtpu wheel that matches jax: `pip install -e .[aot]`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import jax
from absl import flags

from star_jax import sharding
from star_jax.aot import compile as aot_compile
from star_jax.aot import topology
from star_jax.cli import common
from star_jax.configs import validation

USAGE = "--config configs/star.py:size=..,stage=.. --topology v5p-128 are required (or --table)"
GIB = 2**30
BAD_INPUT = (topology.TopologyError, aot_compile.AotError, validation.ConfigError, sharding.ShardingError)
TABLE_STAGES = ("understanding", "generation", "editing")


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v6e-64, v5e-256, v4-32, tpu7x-128", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "slices joined over DCN", flag_values=fv)
    flags.DEFINE_boolean(
        "search", False, "find the largest per-device batch (and remat policy) that fits", flag_values=fv
    )
    flags.DEFINE_list(
        "policies",
        list(aot_compile.REMAT_POLICIES),
        "remat policies --search tries, least recompute first",
        flag_values=fv,
    )
    flags.DEFINE_integer("max_batch", 256, "largest per-device batch --search tries", flag_values=fv)
    flags.DEFINE_float("mfu", 0.5, "fraction of the bf16 peak the step-time estimate assumes", flag_values=fv)
    flags.DEFINE_string("json", None, "write the result(s) here as JSON", flag_values=fv)
    flags.DEFINE_boolean(
        "table", False, "compile every --table_sizes x --table_stages x --table_topologies", flag_values=fv
    )
    flags.DEFINE_list("table_sizes", ["3b", "7b"], "sizes of the table (configs/sizes.py)", flag_values=fv)
    flags.DEFINE_list("table_stages", list(TABLE_STAGES), "stages of the table", flag_values=fv)
    flags.DEFINE_list("table_topologies", ["v5p-128", "v6e-64", "v5e-256"], "slices of the table", flag_values=fv)
    flags.DEFINE_list("table_ici", ["1", "-1", "1"], "config.mesh.ici of every table row (FSDP)", flag_values=fv)
    flags.DEFINE_string(
        "markdown", None, "--table: write the Markdown table here (rows as they finish)", flag_values=fv
    )


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def _mesh(result: aot_compile.AotResult) -> str:
    return "x".join(str(result.mesh[a]) for a in ("data", "fsdp", "tensor"))


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def describe(config, result: aot_compile.AotResult) -> str:
    """The human report of one compile (several lines)."""
    r = result
    slices = f", {r.num_slices} slices" if r.num_slices > 1 else ""
    lines = [
        f"{config.size} {config.stage} on {r.topology}{slices}: {r.num_devices} devices, mesh data x fsdp x tensor "
        f"= {_mesh(r)}, batch {r.batch_size} ({r.per_device_batch:g} per device, grad_accum {r.grad_accum}), "
        f"remat {r.remat_policy}"
    ]
    if r.fits:
        lines.append(
            f"per device: arguments {_gib(r.argument_bytes)}, outputs {_gib(r.output_bytes)} "
            f"(donated {_gib(r.alias_bytes)}), temporaries {_gib(r.temp_bytes)}, code {_gib(r.code_bytes)}"
        )
        lines.append(
            f"peak {_gib(r.peak_bytes)} of {_gib(r.hbm_bytes)} HBM per device "
            f"({100 * r.peak_bytes / r.hbm_bytes:.0f} %, the compiler's peak; the parts above sum to "
            f"{_gib(r.parts_bytes)}, the temporaries being an allocation not all live at once): fits"
        )
        if r.peak_bytes > r.hbm_bytes:
            lines.append(
                "note: the compiler accepted the program although its peak exceeds the HBM it names; "
                "check on the slice before relying on it"
            )
        analytic = f"{r.flops_analytic:.3e}" if r.flops_analytic else "none for this stage"
        scanned = " (a lax.scan body counts once: --config.model.decoder.scan_layers=False for all layers)"
        scanned = scanned if r.scan_layers or r.grad_accum > 1 else ""
        compiled = f"{r.flops_compiled:.3e}" if r.flops_compiled else "?"
        ratio = (
            f", compiler / analytic {r.flops_compiled / r.flops_analytic:.2f}"
            if r.flops_compiled and r.flops_analytic
            else ""
        )
        lines.append(f"FLOPs per step: compiler {compiled}{scanned}; analytic {analytic}{ratio}")
        if r.step_time_s is not None:
            peak = topology.get(r.topology).peak_flops_per_device
            lines.append(
                f"estimate at {100 * r.mfu:.0f} % of {peak / 1e12:.0f} TFLOP/s bf16 per device: step {_time(r.step_time_s)}, "
                f"{r.tokens_per_s:,.0f} tokens/s"
            )
    else:
        need = f"needs at least {_gib(r.peak_bytes)}" if r.peak_bytes else "needs more than"
        if r.temp_bytes is not None and r.argument_bytes is not None:
            need += f" (temporaries {_gib(r.temp_bytes)} + arguments {_gib(r.argument_bytes)})"
        over = f", {_gib(r.over_bytes)} over" if r.over_bytes is not None else ""
        lines.append(f"does NOT fit: {need} of {_gib(r.hbm_bytes)} HBM per device{over}")
        lines.append(f"compiler: {r.compiler_message}")
    lines.append(f"(compiled in {r.compile_s:.0f} s)")
    return "\n".join(lines)


def _write_json(path: str | None, payload) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        os.replace(path + ".tmp", path)


def _entry(config, result: aot_compile.AotResult) -> dict:
    return {"size": config.size, "stage": config.stage, **result.to_dict()}


def _single(prog: str, fv, config, tpu) -> int:
    if fv.search:
        bad = [p for p in fv.policies if p not in aot_compile.REMAT_POLICIES]
        if bad:
            return common.error(prog, f"--policies: {bad[0]!r} is not one of {aot_compile.REMAT_POLICIES}")

        def progress(r):
            state = "fits" if r.fits else "does not fit"
            print(
                f"  remat {r.remat_policy}, {r.per_device_batch:g} per device: {state} ({_gib(r.peak_bytes)})",
                flush=True,
            )

        found = aot_compile.search(
            config,
            tpu,
            fv.num_slices,
            policies=fv.policies,
            max_per_device_batch=fv.max_batch,
            mfu=fv.mfu,
            on_result=progress,
        )
        print("largest per-device batch that fits: " + ", ".join(f"{p} {b}" for p, b in found.per_policy.items()))
        payload = {"search": {"per_policy": found.per_policy, "best_policy": found.best_policy, "tried": found.tried}}
        if found.best is None:
            _write_json(fv.json, payload)
            print(f"nothing fits on {tpu.name}, not even 1 per device with remat {fv.policies[-1]}")
            return 1
        print(f"best: remat {found.best_policy}\n" + describe(config, found.best))
        _write_json(fv.json, {**payload, **_entry(config, found.best)})
        return 0
    result = aot_compile.compile_step(config, tpu, fv.num_slices, mfu=fv.mfu)
    print(describe(config, result))
    _write_json(fv.json, _entry(config, result))
    return 0 if result.fits else 1


def _fits_cell(e: dict) -> str:
    """yes / no; "yes*" when the compiler accepted a program whose peak exceeds its HBM."""
    if not e["fits"]:
        return "no"
    return "yes*" if e["peak_bytes"] and e["peak_bytes"] > e["hbm_bytes"] else "yes"


def table_row(entry: dict) -> str:
    """One Markdown row of a result's JSON entry (`_entry`): size | stage | slice | mesh | per-device
    batch | GiB per device (peak / HBM; "≥" when it does not fit) | fits | step time | tokens/s."""
    e, fits = entry, entry["fits"]
    peak = f"{'' if fits else '≥ '}{e['peak_bytes'] / GIB:.1f}" if e["peak_bytes"] else "?"
    mesh = "x".join(str(e["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    tokens = f"{e['tokens_per_s']:,.0f}" if fits and e["tokens_per_s"] else "-"
    return (
        f"| {e['size']} | {e['stage']} | {e['topology']} | {mesh} | {e['per_device_batch']:g} | "
        f"{peak} / {e['hbm_bytes'] / GIB:.1f} | {_fits_cell(e)} | "
        f"{_time(e['step_time_s']) if fits else '-'} | {tokens} |"
    )


TABLE_HEADER = (
    "| size | stage | slice | mesh (data x fsdp x tensor) | batch per device | GiB per device (peak / HBM) | fits "
    "| est. step time | est. tokens/s |\n|---|---|---|---|---|---|---|---|---|"
)


def _table(prog: str, fv) -> int:
    star = importlib.import_module("star_jax.configs.star")
    try:
        ici = tuple(int(v) for v in fv.table_ici)
        tpus = [topology.get(name) for name in fv.table_topologies]
    except ValueError as e:
        return common.error(prog, e if isinstance(e, topology.TopologyError) else f"--table_ici={fv.table_ici}: {e}")
    rows, entries, worst = [TABLE_HEADER], [], 0
    for size in fv.table_sizes:
        for stage in fv.table_stages:
            for tpu in tpus:
                config = star.get_config(f"size={size},stage={stage}")
                config.mesh.ici = ici
                try:
                    result = aot_compile.compile_step(config, tpu, fv.num_slices, mfu=fv.mfu)
                except BAD_INPUT as e:
                    return common.error(prog, f"{size} {stage} on {tpu.name}: {e}")
                entries.append(_entry(config, result))
                rows.append(table_row(entries[-1]))
                worst = max(worst, 0 if result.fits else 1)
                print(rows[-1], flush=True)
                _write_json(fv.json, entries)
                if fv.markdown:
                    with open(fv.markdown, "w", encoding="utf-8") as f:
                        f.write("\n".join(rows) + "\n")
    return worst


def main(argv: list[str]) -> int:
    """`star-jax aot`: exit 0 fits, 1 does not fit, 2 bad input (module docstring)."""
    if "JAX_PLATFORMS" not in os.environ:  # compile-only TPU devices need no TPU backend here
        jax.config.update("jax_platforms", "cpu")
    fv = common.parse(argv, _define, doc=__doc__)
    prog = argv[0]
    if fv.num_slices < 1:
        return common.error(prog, f"--num_slices={fv.num_slices} must be at least 1")
    if fv.table:
        return _table(prog, fv)
    if fv.config is None or fv.topology is None:
        common.usage_error(prog, USAGE)
    try:
        tpu = topology.get(fv.topology)
        return _single(prog, fv, fv.config, tpu)
    except BAD_INPUT as e:  # the setting and its value, on one line
        return common.error(prog, e)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
