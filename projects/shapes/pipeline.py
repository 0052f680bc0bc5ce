"""The staged shapes-world pipeline: vq -> understanding -> generation -> editing -> evaluation,
each stage a resumable `train_and_evaluate` run under `workdir/<stage>/`, then `report.md` and
`samples.png` in the workdir. A finished stage (DONE marker) is not retrained on a rerun.

`config.stage_overrides.<stage>` holds each stage's settings, merged onto the shared config (after
the stage's registry defaults: trainable set, init sources) when that stage runs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import time

import ml_collections
import numpy as np
from PIL import Image

from star_jax import checkpointing, distributed, init_sources, stages, train
from star_jax.decode import runner as runner_lib
from star_jax.eval import shapes_world
from star_jax.metrics import image_grid


def _merge(base: ml_collections.ConfigDict, overrides) -> None:
    for key, value in overrides.items():
        if (
            isinstance(value, (dict, ml_collections.ConfigDict))
            and key in base
            and isinstance(base[key], ml_collections.ConfigDict)
        ):
            _merge(base[key], value)
        else:
            if key not in base:
                raise KeyError(f"stage override {key!r} is not a config key")
            base[key] = value


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config of one stage: the shared config, the stage's defaults (trainable set, init
    sources), then `config.stage_overrides.<stage>`."""
    c = copy.deepcopy(config)
    with c.unlocked():
        del c["pipeline"]
        del c["stage_overrides"]
    c.stage = stage
    record = stages.for_config(c)
    c.train.trainable = list(record.trainable)
    c.train.init_from = list(record.init_from)
    if stage in config.stage_overrides:
        _merge(c, config.stage_overrides[stage].to_dict())
    return c


def stages_training_the_base(config) -> tuple[str, ...]:
    """The stages after understanding whose trainable patterns reach the base (decoder or ViT):
    none in STAR, which freezes it; `generation` and `editing` in the joint ablation."""
    probes = ("base/embed/embedding", "vision/patch_embed/kernel")
    return tuple(
        stage
        for stage in config.pipeline.stages
        if stage in ("generation", "editing")
        and any(re.search(p, probe) for p in stage_config(config, stage).train.trainable for probe in probes)
    )


def run(config, workdir: str) -> dict:
    """Runs every stage of `config.pipeline.stages`, evaluates, writes the report. Returns its numbers."""
    os.makedirs(workdir, exist_ok=True)
    ev = config.pipeline.eval
    report: dict = {"stage_wall_s": {}, "base_trained_in": stages_training_the_base(config)}
    t_all = time.perf_counter()
    for stage in config.pipeline.stages:
        c = stage_config(config, stage)
        done = checkpointing.is_stage_done(workdir, stage)
        t0 = time.perf_counter()
        if not done:
            last = train.train_and_evaluate(c, workdir)
            report[f"{stage}_final_metrics"] = last
            if not checkpointing.is_stage_done(workdir, stage):
                # Preempted (SIGTERM): the stage saved; later stages must not start from it. The exit
                # status is the trainer's "restart" code, which launch scripts rerun on.
                print(f"[pipeline] stage {stage} was interrupted; rerun the same command to resume it", file=sys.stderr)
                raise SystemExit(distributed.PREEMPTED_EXIT_CODE)
        report["stage_wall_s"][stage] = time.perf_counter() - t0
        if stage == "understanding":
            base_runner = _runner(workdir, ("understanding",))
            report["understanding_before"] = shapes_world.understanding(base_runner, num=ev.qa, seed=ev.seed)
    t0 = time.perf_counter()
    if {"generation", "editing"} & set(config.pipeline.stages):
        vq_model = _evaluate_stack(config, workdir, report)
    elif "vq" in config.pipeline.stages:  # a tokenizer-only run
        vq_model = init_sources.load_workdir(workdir, ("vq",))[0].vq
        report["controls"] = shapes_world.vq_controls(vq_model, per_task=ev.per_task, seed=ev.seed)
    else:  # a base-only run (vision, understanding): its QA against the control
        vq_model = None
        if "understanding_before" in report:
            report["understanding_shuffled"] = shapes_world.understanding(
                base_runner, num=ev.qa, seed=ev.seed, shuffle_images=True
            )
    if vq_model is not None:
        report["vq_ceiling"] = shapes_world.vq_report(
            vq_model,
            per_task=ev.per_task,
            seed=ev.seed,
            usage_images=ev.get("usage_images", 1024),
            locality_edits=ev.get("locality_edits", 128),
        )
    report["stage_wall_s"]["evaluation"] = time.perf_counter() - t0
    report["total_wall_s"] = time.perf_counter() - t_all
    write_report(workdir, report)
    return report


def _runner(workdir: str, names: tuple[str, ...]) -> runner_lib.StarRunner:
    """A decoder over the first of `names` trained under `workdir`."""
    model, config, _ = init_sources.load_workdir(workdir, names)
    return runner_lib.StarRunner(model, config)


def _evaluate_stack(config, workdir: str, report: dict):
    """Generation, understanding after the later stages, editing and caption information of the
    trained stack, into `report`. Returns the run's VQModel."""
    ev = config.pipeline.eval
    star = _runner(workdir, ("editing", "generation"))
    sampling = dict(cfg=ev.cfg, top_k=ev.top_k, top_p=ev.top_p, temperature=ev.temperature)
    report["generation"] = shapes_world.generation(star, per_task=ev.per_task, seed=ev.seed, **sampling)
    report["controls"] = shapes_world.controls(star, per_task=ev.per_task, seed=ev.seed, **sampling)
    if "understanding_before" in report:
        report["understanding_after"] = shapes_world.understanding(star, num=ev.qa, seed=ev.seed)
        report["understanding_shuffled"] = shapes_world.understanding(
            star, num=ev.qa, seed=ev.seed, shuffle_images=True
        )
    generation_runner = star
    if "editing" in config.pipeline.stages:
        edit_sampling = sampling | {"cfg": ev.get("edit_cfg", ev.cfg)}
        report["editing"] = shapes_world.editing(star, num=ev.edits, seed=ev.seed, **edit_sampling)
        # The editing stage trains the same stack on edits alone: what it costs generation.
        generation_runner = _runner(workdir, ("generation",))
        report["generation_before_editing"] = shapes_world.generation(
            generation_runner, per_task=ev.per_task, seed=ev.seed, **sampling
        )
    if "generation" in config.pipeline.stages:
        num = ev.get("caption_pairs", 64)
        report["caption_information"] = shapes_world.caption_information(generation_runner, num=num, seed=ev.seed)
        report["caption_pairs"] = num
    return star.model.vq


CONTROL_TITLES = {
    "untrained_stack": "an untrained stack (the generation stage's start: stack copied from the base, "
    "adapter and head fresh)",
    "random_codes": "VQ decodes of uniformly random codes",
    "fragments": "scattered palette-coloured fragments",
}


def control_line(controls: dict) -> str:
    """The report's control row: ShapeEval overall of each control, against its limit."""
    parts = [f"{CONTROL_TITLES[k]} **{v['summary']['overall']:.3f}**" for k, v in controls.items()]
    worst = max(v["summary"]["overall"] for v in controls.values())
    verdict = "passes" if worst <= shapes_world.CONTROL_LIMIT else "FAILS: the scorer passes noise"
    return (
        f"Controls (ShapeEval overall on the same prompts; each must be <= {shapes_world.CONTROL_LIMIT}, "
        f"{verdict}): " + "; ".join(parts) + "."
    )


def write_report(workdir: str, r: dict) -> None:
    """report.md (tables) + report.json (numbers) + samples.png."""
    lines = ["# STAR on the shapes world", ""]
    if "generation" in r:
        lines += ["## Generation (ShapeEval, GenEval's six tasks)", "", "```", r["generation"]["table"], "```", ""]
    if "controls" in r:
        lines += [control_line(r["controls"]), ""]
    if "generation_before_editing" in r:
        tasks_before = r["generation_before_editing"]["summary"]["tasks"]
        lines += [
            "The same evaluation of the generation stage's checkpoint, before the editing stage trained "
            f"the stack on edits: overall **{r['generation_before_editing']['summary']['overall']:.3f}** ("
            + ", ".join(f"{k} {v[0]:.2f}" for k, v in tasks_before.items())
            + ").",
            "",
        ]
    if "caption_information" in r:
        info = r["caption_information"]
        lines += [
            "What the caption is worth to the generation stage's stack (teacher-forced image-token "
            "cross-entropy in nats, with the caption vs with it replaced by `<|fim_pad|>`, "
            f"{r.get('caption_pairs', 64)} validation pairs): "
            + "; ".join(f"{k.replace('_', ' ')} cells {v['cond']:.2f} vs {v['uncond']:.2f}" for k, v in info.items())
            + ". Naming a colour and a shape is worth log(50) = 3.9 nats at the first object cell.",
            "",
        ]
    if "vq_ceiling" in r:
        lines += [
            f"VQ ceiling (ShapeEval on VQ round trips of ground truth): overall {r['vq_ceiling']['summary']['overall']:.3f}, "
            f"PSNR {r['vq_ceiling']['psnr']:.2f} dB; over {r['vq_ceiling'].get('usage_images', 1024):,} "
            "validation renders: codebook usage "
            f"{r['vq_ceiling']['codebook_usage']:.3f}, token entropy {r['vq_ceiling']['token_entropy_bits']:.2f} bits, "
            f"{r['vq_ceiling']['background_codes']} distinct codes for all-background cells; over "
            f"{r['vq_ceiling'].get('locality_edits', 128)} validation edits, "
            f"{r['vq_ceiling']['edit_codes_kept']:.3f} of the cells whose pixels the edit leaves unchanged "
            f"({r['vq_ceiling']['edit_unchanged_cells']:.3f} of all) keep their code",
            "",
        ]
    if "controls" in r and "generation" not in r:
        lines += [control_line(r["controls"]), ""]
    if "understanding_before" in r and "understanding_shuffled" in r:
        trained_in = r.get("base_trained_in", ())
        titles = {"before": "after understanding stage", "after": "after all stages"}
        if trained_in:
            titles["after"] = "after all stages, base trained (ablation)"
        titles["shuffled"] = "control: another scene's image"
        columns = [(t, r[f"understanding_{k}"]) for k, t in titles.items() if f"understanding_{k}" in r]
        lines += ["## Understanding (exact-match QA accuracy)", ""]
        lines += ["| question | " + " | ".join(t for t, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for kind in r["understanding_before"]["per_kind"]:
            cells = [x["per_kind"].get(kind, float("nan")) for _, x in columns]
            lines.append(f"| {kind} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
        lines += ["| overall | " + " | ".join(f"{x['overall']:.3f}" for _, x in columns) + " |", ""]
        if "understanding_after" in r:
            before, after = r["understanding_before"], r["understanding_after"]
            same = [a[2] for a in before["answers"]] == [a[2] for a in after["answers"]]
            lines += [
                f"Answers bit-identical before and after the generation and editing stages: **{same}**. "
                "The control asks each question about another scene's image: what the base answers from "
                "priors alone.",
                "",
            ]
            r["understanding_unchanged"] = same
            if trained_in:
                lines += [
                    f"This run trains the base in the {' and '.join(trained_in)} stage(s), the ablation of "
                    "STAR's frozen base. STAR keeps the first column's answers bit for bit (its own report "
                    "checks it); the second column is what training the base for images costs understanding.",
                    "",
                ]
    if "editing" in r:
        lines += ["## Editing success", "", "| edit | success |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r["editing"]["per_kind"].items()]
        lines += [f"| overall | {r['editing']['overall']:.3f} |", ""]
    lines += ["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["stage_wall_s"].items()]
    lines += [f"| total | {r['total_wall_s']:.0f} |", ""]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    numbers = {"stage_wall_s": r["stage_wall_s"], "total_wall_s": r["total_wall_s"]}
    numbers["base_trained_in"] = list(r.get("base_trained_in", ()))
    if "vq_ceiling" in r:
        keys = ("psnr", "summary", "codebook_usage", "token_entropy_bits", "background_codes")
        keys += ("edit_unchanged_cells", "edit_codes_kept")
        numbers["vq_ceiling"] = {k: r["vq_ceiling"][k] for k in keys}
    for key in ("generation", "generation_before_editing"):
        if key in r:
            numbers[key] = r[key]["summary"]
    if "controls" in r:
        numbers["controls"] = {k: v["summary"] for k, v in r["controls"].items()}
    if "caption_information" in r:
        numbers["caption_information"] = r["caption_information"]
    for key in ("understanding_before", "understanding_after", "understanding_shuffled", "editing"):
        if key in r:
            numbers[key] = {k: v for k, v in r[key].items() if k in ("per_kind", "overall")}
    if "understanding_unchanged" in r:
        numbers["understanding_unchanged"] = r["understanding_unchanged"]
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(numbers, f, indent=2, default=float)
    if "generation" not in r:
        return
    samples = [r["generation"]["samples"]]
    if "editing" in r:
        samples.append(r["editing"]["samples"])
    grid = image_grid(np.concatenate(samples), cols=len(r["generation"]["samples"]))
    Image.fromarray(grid).save(os.path.join(workdir, "samples.png"))
