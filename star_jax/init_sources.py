"""Where a stage's params start from, and loading a trained workdir.

`config.train.init_from` lists sources applied in order (later ones win for the params they hold):
  "<stage>"        the final params of an earlier stage under the same workdir
  "stage:<dir>"    the final params of the stage saved in <dir> (`<other workdir>/<stage>`)
  "hf:<dir>"       a Hugging Face Qwen2.5-VL / Qwen2 directory -> `base/` and, when the model has a
                   ViT and the directory a `vision_config`, `vision/`; its config.json must agree
                   with the model's decoder / vision configs (one ValueError names every field)
  "vq:<file>"      VQ weights in the reference layout (.safetensors, or a .pt state dict read with
                   torch.load(weights_only=True); standalone or `pixel_encoder.` names) -> `vq/`
  "star:<file>"    the reference STAR state dict (.safetensors / .pt) -> every part the model has
After loading, a model with a stacked AR that no source loaded copies it from the base's last N
layers (`config.model.star.stack_init = "copy_last"`).

Before a run builds anything, `prepare(config, workdir)` checks every source (a missing directory
or file, a stage without a checkpoint, an hf: config.json that disagrees with the size) and picks
the tokenizer: **the tokenizer travels with the weights**. `config.data.tokenizer = "builtin"` (the
default) means "the one that came with the weights" when they came with one: a resumed stage's
saved tokenizer, else the last init source that carries one (an `hf:<dir>` holding
`tokenizer.json`, or a stage trained / imported with one). It is copied into the workdir
(`<workdir>/tokenizer.json`) and the stage's config points at it. Any other value is used as
given. Then the tokenizer must fit the decoder: more ids than `config.model.decoder.vocab_size`,
or special-token ids that disagree with an hf: directory's config.json, stop the run with one line
naming both sizes.

Every source writes straight into the target params' shardings, tensor by tensor: the model is
already built sharded; a reference tensor is read, transformed on the host (numpy), and each device
receives only its own slice (`convert.table.place`); Orbax restores onto the targets' shardings.
No device ever holds more than its shard, and no whole model is built on one device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import jax
import ml_collections
from etils import epath
from flax import nnx

from star_jax import checkpointing, distributed, sharding, stages
from star_jax.configs import validation
from star_jax.convert import decoder_table, hf, hf_config, star_table, tensor_io, vision_table, vq_table
from star_jax.convert.stage_reader import build_star
from star_jax.convert.table import CheckpointError, Entry, load_params
from star_jax.models import qwen2, star, vision
from star_jax.text import tokenizer as tokenizer_lib

SOURCE_KINDS = ("stage", "hf", "vq", "star")


class WorkdirError(ValueError):
    """A workdir that holds no usable STAR checkpoint."""


class SourceError(validation.ConfigError):
    """An init source or tokenizer that cannot start the run; the message is one line naming the
    config key (a ConfigError, so the CLIs print it as one line)."""


# config.json special-token id -> the token it names (Qwen2.5-VL's image / vision markers).
HF_SPECIAL_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
}
BUILTIN_TOKENIZERS = ("builtin", "builtin-stems")


def param_targets(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat '/'-joined path -> current param array (its shape, dtype and sharding are load targets)."""
    return checkpointing.flatten(nnx.state(model, nnx.Param).to_pure_dict())


def _assign(model: nnx.Module, loaded: Mapping[str, jax.Array]) -> set[str]:
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(checkpointing.assign_flat(state.to_pure_dict(), dict(loaded)))
    nnx.update(model, state)
    return set(loaded)


# -- sources ----------------------------------------------------------------------------------------


def load_from_stage(model: nnx.Module, workdir: str, stage: str) -> set[str]:
    """Loads every param of `model` that stage `stage` saved (frozen + newest trainable), restored by
    Orbax onto each param's sharding. Returns the flat paths loaded. Raises if the stage has no checkpoint."""
    ckpts = checkpointing.StageCheckpoints(workdir, stage, read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"stage {stage!r} has no checkpoint under {ckpts.dir}; run it first")
        if not ckpts.is_done():
            logging.warning("stage %s did not finish (no DONE marker); using its step %d", stage, step)
        targets = param_targets(model)
        loaded = ckpts.restore_frozen_params(targets)
        loaded.update(ckpts.restore_params(step, targets))
    finally:
        ckpts.close()
    return _assign(model, loaded)


def _load_tensors(model, entries: Iterable[Entry], tensors: Mapping, *, source: str, ignore=()) -> set[str]:
    """The params among `entries` from reference `tensors`, placed into the model's shardings.
    Entries that are not params (the VQ usage buffer) are skipped, and so are their tensors."""
    targets = param_targets(model)
    entries = list(entries)
    kept = [e for e in entries if e.flax in targets]
    ignore = tuple(ignore) + tuple(e.ref.split("{i}")[0] for e in entries if e.flax not in targets)
    values = load_params({e.flax: targets[e.flax] for e in kept}, kept, tensors, source=source, ignore_prefixes=ignore)
    return _assign(model, values)


def load_hf(model: star.Star, path: str) -> set[str]:
    """`hf:<dir>`: the base (text decoder) and, when the model has a ViT and the directory a
    `vision_config`, the vision tower; raises CheckpointError (a ValueError) naming every config.json
    field that disagrees with the model's configs, or every missing / unexpected / mis-shaped tensor."""
    comps = model.components
    with_base, with_vision = check_hf_dir(
        path, comps, model.decoder_cfg, model.vision_cfg if "vision" in comps else None
    )
    if "vision" in comps and not with_vision:
        logging.warning("hf:%s has no vision_config: loading the text decoder only", path)
    entries, ignore = [], []
    if with_base:
        entries += decoder_table.decoder_entries(model.decoder_cfg.tie_embeddings, "base/")
        ignore += ["lm_head."] if model.decoder_cfg.tie_embeddings else []  # a tied checkpoint may carry a copy
    else:
        ignore += ["model.", "lm_head."]
    if with_vision:
        entries += vision_table.vision_entries(model.vision_cfg, "vision/", "visual.")
    else:
        ignore += ["visual."]
    return _load_tensors(model, entries, hf.read_directory(path), source=f"hf:{path}", ignore=ignore)


def check_hf_dir(
    path: str, components: Sequence[str], decoder: qwen2.DecoderConfig, vision_cfg: vision.VisionConfig | None
) -> tuple[bool, bool]:
    """Checks `hf:<path>` for a model with `components` before anything loads: the directory and its
    config.json exist, and config.json agrees with `decoder` (when the model has a base) and
    `vision_cfg` (when it has a ViT and the directory a `vision_config`). Returns (loads the base,
    loads the ViT). Raises CheckpointError (a ValueError) naming every mismatching field."""
    if not os.path.isdir(path):
        raise CheckpointError(f"no such directory {path}")
    hf_json = hf_config.read_config(path)
    with_base = "base" in components
    with_vision = "vision" in components and bool(hf_json.get("vision_config"))
    if not (with_base or with_vision):
        raise CheckpointError(f"init source hf:{path}: the model ({', '.join(components)}) has no base or vision tower")
    hf_config.check_hf_config(path, decoder if with_base else None, vision_cfg if with_vision else None)
    return with_base, with_vision


def load_vq(model: star.Star, path: str) -> set[str]:
    """`vq:<file>`: the `vq/` params from reference VQ weights (standalone `encoder.*` / `quantize.*`
    or STAR `pixel_encoder.*` names); the usage buffer `quantize.codebook_used` (int64 in the
    reference) is not a param and is skipped."""
    if "vq" not in model.components:
        raise ValueError(f"init source vq:{path}: the model ({', '.join(model.components)}) has no VQ")
    tensors = tensor_io.read_tensors(path)
    try:
        prefix = vq_table.detect_prefix(tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    entries = vq_table.entries(vq_table.state_paths(nnx.state(model.vq, nnx.Param)), flax_prefix="vq/")
    view = vq_table.SubView(tensors, prefix)
    return _load_tensors(model, entries, view, source=f"vq:{path}", ignore=(vq_table.USAGE_NAME,))


VQ_PREFIX = "pixel_encoder."


def load_star_file(model: star.Star, path: str) -> set[str]:
    """`star:<file>`: every param the model has from the reference STAR state dict (`.safetensors`, or a
    `.pt` holding `{'state_dict': ...}` read with weights_only); parts the model lacks are ignored."""
    ignore = star_table.unused_prefixes(model.components)
    if "base" in model.components and model.decoder_cfg.tie_embeddings:
        ignore += ("llm.lm_head.",)
    tensors = star_table.star_tensors(tensor_io.read_tensors(path), path)  # released or newer transformers names
    entries = star_table.star_entries(model)
    if "vq" in model.components and not any(name.startswith(VQ_PREFIX) for name in tensors):
        # The released STAR files ship the VQ apart (a vq:<file> source); `initialise` checks one came.
        logging.info("star:%s holds no %s tensors: the VQ comes from a vq: source", path, VQ_PREFIX)
        entries = [e for e in entries if not e.ref.startswith(VQ_PREFIX)]
    return _load_tensors(model, entries, tensors, source=f"star:{path}", ignore=ignore)


def load_source(model: nnx.Module, workdir: str, source: str) -> set[str]:
    """Applies one `init_from` source (see the module docstring); returns the flat param paths it set."""
    kind, sep, path = source.partition(":")
    if not sep:
        return load_from_stage(model, workdir, source)
    if kind == "stage":
        return load_from_stage(model, *split_stage_dir(path))
    if kind == "hf":
        return load_hf(model, path)
    if kind == "vq":
        return load_vq(model, path)
    if kind == "star":
        return load_star_file(model, path)
    raise ValueError(
        f"config.train.init_from entry {source!r}: expected a stage name, "
        "'stage:<dir>', 'hf:<dir>', 'vq:<file>' or 'star:<file>'"
    )


def initialise(model: nnx.Module, config, workdir: str) -> set[str]:
    """Applies `config.train.init_from` in order (later wins), then copies the stack from the base's
    last layers when no source loaded it and `config.model.star.stack_init == "copy_last"`.
    Call under the model's mesh (`sharding.use_mesh`). Returns the flat param paths the sources
    loaded (the copied stack not included)."""
    loaded: set[str] = set()
    for source in config.train.init_from:
        loaded |= load_source(model, workdir, source)
        logging.info("init_from %s: %d params", source, len(loaded))
    if config.train.init_from and "vq" in model.components and not any(p.startswith("vq/") for p in loaded):
        if any(source.startswith("star:") for source in config.train.init_from):
            raise SourceError(
                f"config.train.init_from={tuple(config.train.init_from)!r}: the star: file holds no VQ "
                "(the released STAR files ship it apart); add 'vq:<file>' after it"
            )
    if "stacked_ar" in model.components and not any(p.startswith("stacked_ar/") for p in loaded):
        if config.model.star.stack_init == "copy_last":
            model.copy_stack_from_base()
            logging.info("stacked AR initialised from the base's last %d layers", config.model.star.stack_layers)
    return loaded


# -- before a run: sources and tokenizer ----------------------------------------------------------


def model_configs(config) -> tuple[tuple[str, ...], qwen2.DecoderConfig, vision.VisionConfig | None]:
    """(the stage's components, its decoder config, its vision config or None without a ViT)."""
    comps = stages.for_config(config).components
    decoder = qwen2.DecoderConfig.from_dict(config.model.decoder)
    vision_cfg = vision.VisionConfig.from_dict(config.model.vision) if "vision" in comps else None
    return comps, decoder, vision_cfg


def check_sources(config, workdir: str, sources: Sequence[str] | None = None) -> None:
    """Checks every init source (default `config.train.init_from`) before any model is built: an
    earlier stage has a complete checkpoint, a file / directory exists, an hf: directory's
    config.json agrees with the size, the model has the part a source fills. Raises a ValueError
    (SourceError or CheckpointError) with one line naming the source."""
    comps, decoder, vision_cfg = model_configs(config)
    for source in config.train.init_from if sources is None else sources:
        try:
            _check_source(source, workdir, comps, decoder, vision_cfg, config.stage)
        except (SourceError, CheckpointError) as e:
            raise SourceError(f"config.train.init_from={source!r}: {e}") from None


def _check_source(source: str, workdir: str, comps, decoder, vision_cfg, stage: str) -> None:
    """One init source of `check_sources`; raises with a message that does not repeat the source."""
    kind, sep, path = source.partition(":")
    if not sep and source not in stages.names():
        raise SourceError(f"not a stage; known: {', '.join(stages.names())} (or stage:/hf:/vq:/star:)")
    if not sep or kind == "stage":
        parent, name = (workdir, source) if not sep else split_stage_dir(path)
        if not checkpointing.has_checkpoint(parent, name):
            raise SourceError(
                f"{os.path.join(parent, name)} holds no complete checkpoint; train or import that stage first"
            )
    elif kind == "hf":
        check_hf_dir(path, comps, decoder, vision_cfg)
    elif kind in ("vq", "star"):
        if not os.path.exists(path):
            raise SourceError(f"no such file {path}")
        if kind == "vq" and "vq" not in comps:
            raise SourceError(f"the {stage} model has no VQ")
    else:
        raise SourceError("expected a stage name, 'stage:<dir>', 'hf:<dir>', 'vq:<file>' or 'star:<file>'")


def split_stage_dir(path: str) -> tuple[str, str]:
    """`stage:<dir>`'s (workdir, stage name): "/runs/a/generation" -> ("/runs/a", "generation");
    URLs ("gs://bucket/run/generation") keep their scheme."""
    p = epath.Path(path.rstrip("/"))
    return str(p.parent), p.name


def _saved_tokenizer(workdir: str, stage: str) -> str | None:
    """The non-builtin tokenizer a stage was saved with (its config.json), if it still exists."""
    path = epath.Path(workdir) / stage / "config.json"
    if not path.exists():
        return None
    name = json.loads(path.read_text()).get("data", {}).get("tokenizer", "builtin")
    if name in BUILTIN_TOKENIZERS:
        return None
    if not epath.Path(name).exists():  # the workdir moved: its own copy
        name = str(epath.Path(workdir) / epath.Path(name).name)
    return name if epath.Path(name).exists() else None


def weights_tokenizer(config, workdir: str, *, resuming: bool) -> str | None:
    """The tokenizer.json that came with the weights a run starts from, or None: a resumed stage's
    saved one; else the last init source carrying one (`hf:<dir>/tokenizer.json`, or the saved
    tokenizer of a `<stage>` / `stage:<dir>` source)."""
    if resuming:
        return _saved_tokenizer(workdir, config.stage)
    found = None
    for source in config.train.init_from:
        kind, sep, path = source.partition(":")
        if not sep:
            found = _saved_tokenizer(workdir, source) or found
        elif kind == "stage":
            found = _saved_tokenizer(*split_stage_dir(path)) or found
        elif kind == "hf" and os.path.isfile(os.path.join(path, "tokenizer.json")):
            found = os.path.join(path, "tokenizer.json")
    return found


def install_tokenizer(path: str, workdir: str) -> tuple[str, bool]:
    """Copies tokenizer.json `path` into `workdir` (as `tokenizer.json`, or `tokenizer-<hash>.json`
    when a different one is already there; nothing when it is already in place). Returns (the
    absolute path in the workdir, whether a file was created). In a multi-process run only process
    0 copies (the others get the same path; the trainer waits for process 0 before reading it)."""
    src, root = _absolute(path), _absolute(workdir)
    if src.parent == root:
        return str(src), False
    data = src.read_bytes()
    dest = root / "tokenizer.json"
    if dest.exists() and dest.read_bytes() != data:
        dest = root / f"tokenizer-{hashlib.sha256(data).hexdigest()[:10]}.json"
    if dest.exists() or not distributed.is_writer():
        return str(dest), False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{dest.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.rename(dest)
    return str(dest), True


def _absolute(path: str) -> epath.Path:
    """`path` as an epath.Path, made absolute when it is local (URLs are absolute already)."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _hf_special_ids(path: str) -> dict[str, int]:
    """Token name -> id of the special tokens a Hugging Face config.json names (top level or text_config)."""
    hf_json = hf_config.read_config(path)
    text = hf_json.get("text_config") or {}
    out = {}
    for key, token in HF_SPECIAL_TOKENS.items():
        value = hf_json.get(key, text.get(key))
        if value is not None:
            out[token] = int(value)
    return out


def check_tokenizer(config, hf_dirs: Sequence[str] = ()) -> None:
    """Checks that `config.data.tokenizer` fits the decoder (stages with a base only): it needs no
    more ids than `config.model.decoder.vocab_size`, and its special tokens have the ids that the
    config.json of each of `hf_dirs` names (ids inside the vocabulary only). Raises SourceError
    with one line naming the tokenizer's and the decoder's sizes."""
    comps, decoder, _ = model_configs(config)
    if "base" not in comps:
        return
    name = config.data.tokenizer
    try:
        tok = tokenizer_lib.load_tokenizer(name)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise SourceError(f"config.data.tokenizer={name!r}: cannot be read ({e})") from None
    sizes = (
        f"the tokenizer has {tok.vocab_size} ids, the decoder {decoder.vocab_size} (config.model.decoder.vocab_size)"
    )
    if tok.vocab_size > decoder.vocab_size:
        raise SourceError(
            f"config.data.tokenizer={name!r} does not fit the decoder: {sizes}; use the tokenizer of the weights"
        )
    for path in hf_dirs:
        wrong = []
        for token, want in _hf_special_ids(path).items():
            if want >= decoder.vocab_size:
                continue  # an id the decoder cannot hold names nothing this model reads
            try:
                got = tok.special(token)
            except ValueError:
                got = None
            if got != want:
                wrong.append(f"{token} is {want} there, {got} in the tokenizer")
        if wrong:
            raise SourceError(
                f"config.data.tokenizer={name!r} is not the tokenizer of {path}: {'; '.join(wrong)} ({sizes}); "
                f"set config.data.tokenizer to {os.path.join(path, 'tokenizer.json')}"
            )


def check_start(config, workdir: str) -> bool:
    """Checks the init sources a fresh start of `config.stage` in `workdir` reads (`check_sources`;
    nothing when the stage resumes from its own checkpoint). Reads no weights and writes nothing.
    Returns whether the stage resumes. Raises ValueError, one line."""
    resuming = checkpointing.has_checkpoint(workdir, config.stage)
    if not resuming:
        check_sources(config, workdir)
    return resuming


def prepare(config, workdir: str) -> tuple[object, list[str]]:
    """What a run checks and decides before it builds anything (see the module docstring): on a fresh
    start every init source (`check_sources`); the tokenizer that travels with the weights
    (installed in the workdir when `config.data.tokenizer` is "builtin"); that it fits the decoder
    (`check_tokenizer`). Returns (the config, a copy when the tokenizer changed; the files it
    created, for a caller that cleans up after a failed start). Raises ValueError, one line."""
    resuming = check_start(config, workdir)
    created = []
    if config.data.tokenizer == "builtin":
        found = weights_tokenizer(config, workdir, resuming=resuming)
        if found is not None:
            path, new = install_tokenizer(found, workdir)
            created += [path] if new else []
            config = config.copy_and_resolve_references()
            config.data.tokenizer = path
            print(f"[{config.stage}] tokenizer: {path} (came with the weights)", flush=True)
    hf_dirs = [] if resuming else [s[3:] for s in config.train.init_from if s.startswith("hf:")]
    try:
        check_tokenizer(config, hf_dirs)
    except ValueError:
        for path in created:
            epath.Path(path).unlink(missing_ok=True)
        raise
    return config, created


# -- a trained workdir ------------------------------------------------------------------------------


def read_stage_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
    """The config saved in `workdir/<stage>/config.json`."""
    return ml_collections.ConfigDict(json.loads((epath.Path(workdir) / stage / "config.json").read_text()))


def first_trained_stage(workdir: str, stages: Sequence[str]) -> tuple[str, ml_collections.ConfigDict] | None:
    """(name, saved config) of the first of `stages` under `workdir` with a config.json and a checkpoint, or None."""
    for name in stages:
        if not (epath.Path(workdir) / name / "config.json").exists():
            continue
        ckpts = checkpointing.StageCheckpoints(workdir, name, read_only=True)
        try:
            has = ckpts.latest_step() is not None
        finally:
            ckpts.close()
        if has:
            return name, read_stage_config(workdir, name)
    return None


def load_workdir(workdir: str, stages: Sequence[str]) -> tuple[star.Star, ml_collections.ConfigDict, str]:
    """The first of `stages` under `workdir` with a config.json and a checkpoint, on one device.

    Builds that stage's model (its registry components) on a single-device mesh and restores its
    params (frozen + newest step). Returns (model, saved config, stage name); e.g.
    `runner.StarRunner(*load_workdir(w, ("editing", "generation"))[:2])`.
    Raises:
      WorkdirError naming the workdir when it does not exist or holds none of `stages`.
    """
    if not epath.Path(workdir).is_dir():
        raise WorkdirError(f"--workdir {workdir!r} does not exist")
    stages = tuple(stages)
    found = first_trained_stage(workdir, stages)
    if found is None:
        raise WorkdirError(f"--workdir {workdir!r} has no trained {' or '.join(stages)} checkpoint")
    name, config = found
    if config.data.tokenizer not in BUILTIN_TOKENIZERS and not epath.Path(config.data.tokenizer).exists():
        config.data.tokenizer = _saved_tokenizer(workdir, name) or config.data.tokenizer  # a moved workdir
    mesh, rules = sharding.single_device_mesh(), sharding.DEFAULT_RULES
    model = sharding.create_sharded(lambda: build_star(config, name, rngs=nnx.Rngs(0)), mesh, rules)
    with sharding.use_mesh(mesh, rules):
        load_from_stage(model, workdir, name)
    return model, config, name
