"""`--verify`: exported weights loaded in PyTorch (transformers for the decoder parts) against star_jax.

On fixed inputs (text ids followed by image codes, text positions), star_jax computes the base's
text logits, the base's final-normed hidden states over [text embeddings, adapter(codebook[codes])],
the stacked AR's output and the image logits. PyTorch recomputes the same chain from the exported
tensors only: the base from the Hugging Face directory (`from_pretrained(local_files_only=True)`)
or from the STAR file's `llm.` tensors, the stack as a transformers `Qwen2Model` of N layers
holding `stacked_ar.model.*`, the adapter and head as plain torch ops. The largest absolute
differences are returned (and printed by the CLIs). With text positions M-RoPE equals 1-D RoPE,
so a Qwen2 decoder is the reference for the stack.

What is compared depends on the stage's parts (every stage can be verified): a base gives text
logits; a ViT with a Hugging Face directory gives the vision tower's output on a fixed image grid
(`hf_vision`); base + stack + adapter + head + VQ give the STAR chain; a VQ gives `vq_tensors`, the
largest difference between its saved tensors and the exported / source ones (a VQ-only stage has
no PyTorch forward here). Tensors the given exports lack (e.g. the stack of a stage imported from a
Hugging Face directory, copied from the base) are taken from the stage itself, so its chain is
still recomputed in PyTorch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import sharding
from star_jax.convert import star_table
from star_jax.convert.hf_config import qwen2_text_config
from star_jax.convert.stage_reader import StageReader, build_star, stage_config
from star_jax.convert.table import CheckpointError, place, to_ref
from star_jax.models import star

CHAIN = ("base", "stacked_ar", "pixel_adapter", "image_head", "vq")  # the parts of the STAR chain


def has_chain(model: star.Star) -> bool:
    """Whether the model has every part of the text -> image-token chain (base, stack, adapter, head, VQ)."""
    return all(c in model.components for c in CHAIN)


def fixed_inputs(model: star.Star, batch: int = 2, text_len: int = 10, image_len: int = 6, seed: int = 0):
    """(ids [B, T] int32 in the text vocabulary, or None without a base; codes [B, N] int32 in the
    codebook, or None without the STAR chain)."""
    rng = np.random.RandomState(seed)
    ids = codes = None
    if "base" in model.components:
        ids = rng.randint(0, model.decoder_cfg.vocab_size, (batch, text_len)).astype(np.int32)
    if has_chain(model):
        codes = rng.randint(0, model.vq_cfg.codebook_size, (batch, image_len)).astype(np.int32)
    return ids, codes


def vision_inputs(model: star.Star, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pixel patches [N, patch_dim] float32, grid_thw [[1, h, w]]): one image of 2 x 2 attention windows."""
    cfg = model.vision_cfg
    side = 2 * (cfg.window_size // cfg.patch_size)
    grid = np.array([[1, side, side]])
    pixels = np.random.RandomState(seed).randn(side * side, cfg.patch_dim).astype(np.float32)
    return pixels, grid


def jax_outputs(model: star.Star, ids: np.ndarray | None, codes: np.ndarray | None) -> dict[str, np.ndarray]:
    """star_jax's text_logits [B, T, V] (with a base), stack_hidden [B, T + N, D] and image_logits
    [B, N, K] (with the chain and codes), as float32."""
    if ids is None:
        return {}
    if codes is None:
        return {"text_logits": np.asarray(model.base(ids), np.float32)}
    b, t = ids.shape
    total = t + codes.shape[1]
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (3, b, total))
    x = jnp.concatenate([model.base.embed(ids), model.embed_codes(codes).astype(model.base.embed(ids).dtype)], axis=1)
    h, _ = model.base.hidden(x, positions)
    h2, _ = model.stacked_ar(h, positions)
    out = dict(text_logits=model.base(ids), stack_hidden=h2, image_logits=model.image_head(h2[:, t:]))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _torch(a):
    import torch

    return torch.from_numpy(np.asarray(a, np.float32).copy())


def torch_qwen2(cfg, tensors: Mapping, prefix: str, num_layers: int, *, causal_lm: bool):
    """A transformers Qwen2ForCausalLM (`causal_lm`) or Qwen2Model holding `{prefix}model.*` tensors (fp32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    fields = qwen2_text_config(cfg, num_layers=num_layers, vocab_size=None if causal_lm else 1)
    hf_cfg = Qwen2Config(**fields, tie_word_embeddings=cfg.tie_embeddings and causal_lm)
    model = (Qwen2ForCausalLM if causal_lm else Qwen2Model)(hf_cfg).eval()
    strip = prefix if causal_lm else prefix + "model."
    keep = (prefix + "model.", prefix + "lm_head.")  # not the vision tower under llm.visual.
    state = {n[len(strip) :]: _torch(tensors[n]) for n in tensors if n.startswith(keep)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if hf_cfg.tie_word_embeddings else set()
    allowed |= set() if causal_lm else {"embed_tokens.weight"}
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{prefix}: missing {sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}")
    return model


def _load_hf(hf_dir: str):
    import transformers

    with open(os.path.join(hf_dir, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(hf_dir, local_files_only=True, dtype="float32").eval()


def torch_outputs(
    model: star.Star, ids, codes, *, tensors: Mapping | None = None, hf_dir: str | None = None, hf_model=None
) -> dict:
    """The same outputs as `jax_outputs`, computed in PyTorch from exported weights only
    (`hf_model`: the directory's transformers model when already loaded)."""
    import torch

    out, base_hidden = {}, None
    tensors = tensors or {}
    has = lambda prefix: any(n.startswith(prefix) for n in tensors)
    if ids is None:
        return out
    with torch.no_grad():
        ids_t = torch.from_numpy(ids.astype(np.int64))
        if hf_dir:
            hf_model = hf_model if hf_model is not None else _load_hf(hf_dir)
            out["hf_text_logits"] = hf_model(input_ids=ids_t).logits.float().numpy()
            text = hf_model.model.language_model if hasattr(hf_model.model, "language_model") else hf_model.model
            base_hidden = lambda x: text(inputs_embeds=x).last_hidden_state
        if has("llm.model."):
            base = torch_qwen2(model.decoder_cfg, tensors, "llm.", model.decoder_cfg.num_layers, causal_lm=True)
            out["text_logits"] = base(input_ids=ids_t).logits.float().numpy()
            base_hidden = lambda x: base.model(inputs_embeds=x).last_hidden_state
        if codes is None or base_hidden is None or not has("stacked_ar.") or not has("pixel_adapter."):
            return out
        codebook = _torch(tensors["pixel_encoder.quantize.embedding.weight"])
        if model.vq_cfg.l2_norm:
            codebook = torch.nn.functional.normalize(codebook, dim=-1)
        x = codebook[torch.from_numpy(codes.astype(np.int64))]
        for j in range(model.star_cfg.adapter_depth):
            if j:
                x = torch.nn.functional.gelu(x)  # exact (erf) GELU
            w, b = (tensors[f"pixel_adapter.layers.{2 * j}.{k}"] for k in ("weight", "bias"))
            x = torch.nn.functional.linear(x, _torch(w), _torch(b))
        embed = (hf_model if hf_dir else base).get_input_embeddings()(ids_t)
        h = base_hidden(torch.cat([embed, x], dim=1))
        stack = torch_qwen2(model.decoder_cfg, tensors, "stacked_ar.", model.star_cfg.stack_layers, causal_lm=False)
        h2 = stack(inputs_embeds=h).last_hidden_state
        out["stack_hidden"] = h2.numpy()
        w, b = (_torch(tensors[f"pixel_output_head.{k}"]) for k in ("weight", "bias"))
        out["image_logits"] = torch.nn.functional.linear(h2[:, ids.shape[1] :], w, b).numpy()
    return out


def vision_diff(model: star.Star, hf_dir: str, hf_model=None) -> float | None:
    """Largest |star_jax - transformers| of the vision tower's output on `vision_inputs`, or None
    when the model has no ViT or the directory is a text-only Qwen2."""
    import torch

    if "vision" not in model.components:
        return None
    hf_model = hf_model if hf_model is not None else _load_hf(hf_dir)
    inner = getattr(hf_model, "model", hf_model)
    visual = getattr(inner, "visual", None) or getattr(hf_model, "visual", None)
    if visual is None:
        return None
    pixels, grid = vision_inputs(model)
    with torch.no_grad():
        ref = visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
    ref = getattr(ref, "pooler_output", ref)
    ours = np.asarray(model.vision(pixels, grid), np.float32)
    return float(np.max(np.abs(ours - ref.float().numpy())))


def stage_tensors(model: star.Star, prefixes: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The model's tensors under the reference STAR names (`star_table.star_entries`), as numpy;
    only the names starting with one of `prefixes` when given."""
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    entries = [e for e in star_table.star_entries(model) if e.flax in flat]
    if prefixes is not None:
        entries = [e for e in entries if e.ref.startswith(prefixes)]
    return {n: t for e in entries for n, t in to_ref(e, np.asarray(flat[e.flax]))}


class _Overlay(Mapping):
    """`primary`'s tensors, then `fallback`'s for the names `primary` lacks."""

    def __init__(self, primary: Mapping, fallback: Mapping):
        self._maps = (primary, fallback)
        self._names = list(primary) + [n for n in fallback if n not in primary]

    def __getitem__(self, name):
        return self._maps[0][name] if name in self._maps[0] else self._maps[1][name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def vq_tensor_diff(model: star.Star, tensors: Mapping) -> float | None:
    """Largest |saved - given| over the VQ's reference tensors (`pixel_encoder.*`) that `tensors`
    holds, or None when the model has no VQ or `tensors` none of its tensors."""
    if "vq" not in model.components:
        return None
    ours = stage_tensors(model, (star_table.STAR_PREFIXES["vq"],))
    shared = [n for n in ours if n in tensors and not n.endswith("codebook_used")]
    if not shared:
        return None
    return max(float(np.max(np.abs(ours[n].astype(np.float32) - np.asarray(tensors[n], np.float32)))) for n in shared)


def compare(
    model: star.Star,
    *,
    tensors: Mapping | None = None,
    hf_dir: str | None = None,
    fill_from_model: bool = False,
    **input_kw,
) -> dict:
    """Largest |star_jax - PyTorch| per output (`hf_text_logits`, `text_logits`, `hf_vision`,
    `stack_hidden`, `image_logits`) and per VQ tensor (`vq_tensors`), only those the model's parts
    and the given exports allow. fill_from_model: the chain's tensors the exports lack come from the
    model itself (so e.g. a Hugging Face export still has its stack, adapter and head checked)."""
    tensors = tensors or {}
    ids, codes = fixed_inputs(model, **input_kw)
    ours = jax_outputs(model, ids, codes)
    full = tensors
    if codes is not None and fill_from_model:  # the chain's parts the exports lack; the base only if no export has one
        prefixes = tuple(star_table.STAR_PREFIXES[p] for p in ("stacked_ar", "pixel_adapter", "image_head"))
        prefixes += (star_table.STAR_PREFIXES["vq"] + "quantize.embedding",)
        if not hf_dir and not any(n.startswith("llm.model.") for n in tensors):
            prefixes += (star_table.STAR_PREFIXES["base"],)
        full = _Overlay(tensors, stage_tensors(model, prefixes))
    hf_model = _load_hf(hf_dir) if hf_dir else None
    theirs = torch_outputs(model, ids, codes, tensors=full, hf_dir=hf_dir, hf_model=hf_model)
    diffs = {k: float(np.max(np.abs(ours[k.removeprefix("hf_")] - v))) for k, v in theirs.items()}
    vision = vision_diff(model, hf_dir, hf_model) if hf_dir else None
    extra = {"hf_vision": vision, "vq_tensors": vq_tensor_diff(model, tensors)}
    return diffs | {k: v for k, v in extra.items() if v is not None}


def load_stage_model(workdir: str, stage: str, *, compute_dtype: str | None = "float32") -> star.Star:
    """The stage's STAR with its saved params (and VQ usage buffer), built abstractly and filled
    tensor by tensor from the checkpoint (no initialisers run). compute_dtype None keeps the config's."""
    config = stage_config(workdir, stage)
    if compute_dtype:
        config.model.decoder.dtype = compute_dtype
    mesh = sharding.single_device_mesh()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        graphdef, state = nnx.get_abstract_model(lambda: build_star(config, stage, rngs=nnx.Rngs(0)), mesh)
    reader = StageReader(workdir, stage)
    try:
        flat = dict(nnx.to_flat_state(state))
        paths = {"/".join(map(str, p)): p for p in flat}
        missing = sorted(set(paths) - set(reader.metadata))
        if missing:
            raise CheckpointError(f"{reader.dir}: step {reader.step} lacks {missing[:20]}")
        values = reader.read_many(list(paths))
    finally:
        reader.close()
    for path, key in paths.items():
        abstract = flat[key].get_value()
        flat[key].set_value(place(values.pop(path).astype(abstract.dtype), abstract.sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def verify_export(workdir: str, stage: str, *, tensors: Mapping | None = None, hf_dir: str | None = None) -> dict:
    """Loads the stage in star_jax and compares with the exports (any stage, see the module
    docstring); prints and returns the diffs. Raises CheckpointError when nothing could be compared."""
    diffs = compare(load_stage_model(workdir, stage), tensors=tensors, hf_dir=hf_dir, fill_from_model=True)
    if not diffs:
        raise CheckpointError(f"verify: nothing of stage {stage!r} could be compared with the given exports")
    for name, value in diffs.items():
        print(f"verify {name}: max |star_jax - torch| = {value:.3e}")
    print(f"verify: largest difference {max(diffs.values(), default=float('nan')):.3e}")
    return diffs
