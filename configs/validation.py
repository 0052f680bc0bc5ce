"""Config validation, run before anything compiles or loads. Errors name the key and the value.

The init sources a run reads (`config.train.init_from`: checkpoints, files, an `hf:` directory's
config.json) are checked by `star_jax.init_sources.check_start`, which knows how each is read.
"""

from __future__ import annotations

import difflib
import re

import ml_collections

from star_jax import sharding, stages
from star_jax.configs import common, sizes

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
    """An invalid config value; the message starts with `config.<key>=<value>`."""


def _fail(key: str, value, why: str):
    raise ConfigError(f"config.{key}={value!r}: {why}")


def _did_you_mean(value, known) -> str:
    close = difflib.get_close_matches(str(value), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _positive(block, prefix: str):
    for key, value in block.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
            continue
        values = value if isinstance(value, (tuple, list)) else [value]
        if key in ("fullatt_block_indexes",):
            if any(v < 0 for v in values):
                _fail(f"{prefix}.{key}", value, "indexes must be >= 0")
            continue
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0 for v in values):
            _fail(f"{prefix}.{key}", value, "must be positive")


def validate_decoder(d, prefix="model.decoder"):
    _positive(d, prefix)
    if d.hidden_size % d.num_heads:
        _fail(f"{prefix}.num_heads", d.num_heads, f"hidden_size {d.hidden_size} is not divisible by it")
    if d.num_heads % d.num_kv_heads:
        _fail(f"{prefix}.num_kv_heads", d.num_kv_heads, f"does not divide num_heads {d.num_heads}")
    if len(d.mrope_section) != 3 or sum(d.mrope_section) != d.head_dim // 2:
        _fail(
            f"{prefix}.mrope_section",
            tuple(d.mrope_section),
            f"must be 3 sections summing to head_dim/2 = {d.head_dim // 2}",
        )
    for key in ("dtype", "param_dtype"):
        if d.get(key, "float32") not in DTYPES:
            _fail(f"{prefix}.{key}", d.get(key), f"not one of {DTYPES}")
    if d.get("remat_policy", "none") not in REMAT:
        _fail(f"{prefix}.remat_policy", d.remat_policy, f"not one of {REMAT}")


def validate_vision(v, prefix="model.vision"):
    _positive(v, prefix)
    if v.hidden_size % v.num_heads:
        _fail(f"{prefix}.num_heads", v.num_heads, f"hidden_size {v.hidden_size} is not divisible by it")
    unit = v.patch_size * v.spatial_merge_size
    if v.window_size % unit:
        _fail(f"{prefix}.window_size", v.window_size, f"must be a multiple of patch_size * spatial_merge_size = {unit}")
    bad = [i for i in v.fullatt_block_indexes if i >= v.depth]
    if bad:
        _fail(f"{prefix}.fullatt_block_indexes", tuple(v.fullatt_block_indexes), f"indexes {bad} >= depth {v.depth}")


def validate_vq(q, prefix="model.vq"):
    _positive(q, prefix)
    factor = q.get("patch_size", 1) * 2 ** (len(q.ch_mult) - 1)
    if q.image_size % factor:
        _fail(f"{prefix}.image_size", q.image_size, f"must be divisible by the downsampling factor {factor}")
    for m in q.ch_mult:
        if (q.ch * m) % q.norm_groups:
            _fail(f"{prefix}.norm_groups", q.norm_groups, f"does not divide channel count {q.ch * m}")


def _validate_lr_mults(mults) -> None:
    for pair in mults:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            _fail("train.lr_mults", pair, "each entry must be a (regex, factor) pair")
        pattern, factor = pair
        try:
            re.compile(pattern)
        except re.error as e:
            _fail("train.lr_mults", pattern, f"not a regular expression ({e})")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            _fail("train.lr_mults", pair, "the factor must be a positive number")


def validate(config, num_devices: int | None = None) -> None:
    """Checks a full STAR config; raises ConfigError naming the first bad key and value."""
    if config.size not in sizes.SIZES:
        _fail(
            "size", config.size, f"unknown size{_did_you_mean(config.size, sizes.SIZES)}; known: {sorted(sizes.SIZES)}"
        )
    try:
        stages.import_projects(config)
    except ImportError as e:
        _fail("imports", tuple(config.get("imports", ())), f"cannot import {e.name or e}")
    if config.stage not in stages.names():
        known = stages.names()
        _fail("stage", config.stage, f"unknown stage{_did_you_mean(config.stage, known)}; known: {', '.join(known)}")
    validate_decoder(config.model.decoder)
    validate_vision(config.model.vision)
    validate_vq(config.model.vq)
    _positive({k: v for k, v in config.model.star.items() if k != "caption_dropout"}, "model.star")
    if not 0.0 <= config.model.star.get("caption_dropout", 0.1) < 1.0:
        _fail("model.star.caption_dropout", config.model.star.caption_dropout, "must be in [0, 1) (0 = no CFG rows)")
    if config.model.star.get("stack_init", "copy_last") not in ("copy_last", "random"):
        _fail("model.star.stack_init", config.model.star.stack_init, "not one of ('copy_last', 'random')")
    if config.model.star.stack_init == "copy_last" and config.model.star.stack_layers > config.model.decoder.num_layers:
        _fail(
            "model.star.stack_layers",
            config.model.star.stack_layers,
            f"cannot copy more layers than the base has ({config.model.decoder.num_layers})",
        )
    _validate_prompt_len(config, stages.get(config.stage))
    if "train" in config:
        for key, example in (("init_from", "('hf:/models/qwen',)"), ("trainable", "('^vision/',)")):
            value = config.train.get(key, ())
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                _fail(f"train.{key}", value, f"must be a tuple of strings, e.g. {example}")
        for key in ("batch_size", "num_steps", "grad_accum"):
            if config.train[key] <= 0:
                _fail(f"train.{key}", config.train[key], "must be positive")
        if config.train.batch_size % config.train.grad_accum:
            _fail("train.grad_accum", config.train.grad_accum, f"does not divide batch_size {config.train.batch_size}")
        _validate_lr_mults(config.train.get("lr_mults", ()))
        if config.train.get("sample_every", 0) < 0:
            _fail("train.sample_every", config.train.sample_every, "must be >= 0 (0 = no sample grids)")
        if config.train.get("sample_every", 0) and config.train.get("sample_num", 8) <= 0:
            _fail("train.sample_num", config.train.sample_num, "must be positive when train.sample_every > 0")
    try:
        rules = sharding.rules_from_config(config)
        sharding.check_rules(rules)
        if num_devices is not None:
            shape = sharding.resolve_mesh_shape(config.mesh.ici, config.mesh.dcn, num_devices)
            if "train" in config:
                batch_shards = shape[0] * shape[1]
                per_step = config.train.batch_size // config.train.grad_accum
                if per_step % batch_shards:
                    _fail(
                        "train.batch_size",
                        config.train.batch_size,
                        f"microbatch {per_step} not divisible by data x fsdp = {batch_shards}",
                    )
    except sharding.ShardingError as e:
        raise ConfigError(str(e)) from None


def _validate_prompt_len(config, stage) -> None:
    """The ViT input size tiles into merged patches, and `data.max_prompt_len` holds at least the
    stage's fixed part (chat template + image blocks + one text token)."""
    if "data" not in config:
        return
    if stage.uses_vit:
        s, unit = config.data.vit_image_size, config.model.vision.patch_size * config.model.vision.spatial_merge_size
        if s <= 0 or s % unit:
            _fail("data.vit_image_size", s, f"must be a positive multiple of patch_size * spatial_merge_size = {unit}")
        _validate_pixel_bounds(config.data, unit)
    if not common.has_prompt(stage):
        return
    needed = common.prompt_len_needed(config, stage, 1)
    if config.data.max_prompt_len < needed:
        _fail(
            "data.max_prompt_len",
            config.data.max_prompt_len,
            f"a prompt of stage {stage.name!r} needs at least {needed} tokens at this size (template + image blocks "
            f"+ text); {common.default_max_prompt_len(config, stage)} fits a typical one",
        )


def _validate_pixel_bounds(data, unit: int) -> None:
    """data.vit_{min,max,edit_max}_pixels: integers >= 0 (0 = vit_image_size ** 2), each maximum at
    least one merged patch (unit ** 2 pixels) and at least the minimum."""
    for key in ("vit_min_pixels", "vit_max_pixels", "vit_edit_max_pixels"):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail(f"data.{key}", value, "must be an integer >= 0 (pixels; 0 = data.vit_image_size ** 2)")
    low = data.get("vit_min_pixels", 0) or data.vit_image_size**2
    for key in ("vit_max_pixels", "vit_edit_max_pixels"):
        high = data.get(key, 0) or data.vit_image_size**2
        if high < max(low, unit * unit):
            _fail(
                f"data.{key}",
                data.get(key, 0),
                f"below data.vit_min_pixels ({low}) or one merged patch ({unit} x {unit} = {unit * unit} pixels)",
            )


def validate_sizes_table() -> None:
    """Validates every size in the table (used by tests)."""
    for name, size in sizes.SIZES.items():
        for block, fn in (("decoder", validate_decoder), ("vision", validate_vision), ("vq", validate_vq)):
            try:
                fn(ml_collections.ConfigDict(size[block]), prefix=f"{name}.{block}")
            except ConfigError as e:
                raise ConfigError(f"size {name}: {e}") from None
