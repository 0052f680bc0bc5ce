"""3-D M-RoPE position ids (temporal, height, width) for mixed text + image sequences.

Text tokens get 1-D positions (all three streams equal, one step per token). An image of patch grid
(t, h, w) occupies t * (h/m) * (w/m) merged tokens (m = spatial_merge_size) whose positions are
start + (t_idx, h_idx, w_idx) over the merged grid; the text after it resumes at
start + max(h, w) / m, i.e. max(position) + 1. `rope_index` equals transformers'
`Qwen2_5_VLModel.get_rope_index` for images (tokens typed by `input_ids == image_token_id`, as the
HF processor's `mm_token_type_ids`); `editing_positions` builds STAR's editing layout (STAR_SPEC
section 4), where the VQ block counts as text and only the ViT block gets (t, h, w) positions.
Everything here is numpy on concrete ids: positions are computed on the host, before jit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TEXT, IMAGE = "text", "image"


def image_positions(start: int, grid_thw: Sequence[int], spatial_merge_size: int = 2) -> np.ndarray:
    """Positions [3, t * h/m * w/m] int64 of one image's merged tokens, offset by `start`."""
    t, h, w = (int(v) for v in grid_thw)
    m = spatial_merge_size
    if h % m or w % m:
        raise ValueError(f"grid_thw={tuple(grid_thw)}: h and w must be divisible by spatial_merge_size={m}")
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + start


def layout_positions(segments: Sequence[tuple[str, object]], spatial_merge_size: int = 2) -> np.ndarray:
    """Positions [3, L] int64 for a sequence described as segments, in order.

    Args:
      segments: ("text", n) for n 1-D tokens, or ("image", (t, h, w)) for an image of that patch grid
        (t * h/m * w/m tokens). Anything 1-D that is not ViT output (text, VQ tokens, adapter
        embeddings) is "text".
    """
    parts, pos = [], 0
    for kind, value in segments:
        if kind == TEXT:
            n = int(value)
            parts.append(np.broadcast_to(np.arange(pos, pos + n, dtype=np.int64), (3, n)))
            pos += n
        elif kind == IMAGE:
            parts.append(image_positions(pos, value, spatial_merge_size))
            pos += max(int(value[1]), int(value[2])) // spatial_merge_size
        else:
            raise ValueError(f"segment kind {kind!r} is not 'text' or 'image'")
    return np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)


def _runs(mask: np.ndarray) -> list[tuple[bool, int, int]]:
    """(value, start, end) runs of equal values in a 1-D bool array."""
    if mask.size == 0:
        return []
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [mask.size]])
    return [(bool(mask[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """M-RoPE positions of a batch, equal to transformers' `get_rope_index` (images).

    Args:
      input_ids: [B, T] int token ids; each image is one run of `image_token_id` tokens.
      image_grid_thw: [num_images, 3] int patch grids of all images in the batch, in order of
        appearance (row 0 first); None when there are no images.
      image_token_id: the `<|image_pad|>` id.
      spatial_merge_size: the vision tower's merge size m.
      attention_mask: optional [B, T] {0, 1}; padding (0) is skipped and gets position 0.
    Returns:
      positions [3, B, T] int32.
    Raises:
      ValueError when an image run's length is not t * h/m * w/m of its grid, or the grids run out.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids shape {input_ids.shape}: expected [B, T]")
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw)]
    valid = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    out = np.zeros((3, *input_ids.shape), np.int64)
    next_image = 0
    for b in range(input_ids.shape[0]):
        is_image = input_ids[b][valid[b]] == image_token_id
        segments = []
        for image, start, end in _runs(is_image):
            if not image:
                segments.append((TEXT, end - start))
                continue
            if next_image >= len(grids):
                raise ValueError(f"row {b}: image run at tokens [{start}, {end}) but only {len(grids)} grids given")
            t, h, w = grids[next_image]
            if end - start != t * h * w // spatial_merge_size**2:
                raise ValueError(
                    f"row {b}: image {next_image} has {end - start} tokens, grid_thw={(t, h, w)} needs "
                    f"{t * h * w // spatial_merge_size**2} (spatial_merge_size={spatial_merge_size})"
                )
            segments.append((IMAGE, (t, h, w)))
            next_image += 1
        out[:, b, valid[b]] = layout_positions(segments, spatial_merge_size)
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} grids but input_ids hold {next_image} images")
    return out.astype(np.int32)


def editing_positions(
    prompt_len: int,
    vit_grid_thw: Sequence[int],
    *,
    insert_at: int = 14,
    num_vq_tokens: int = 576,
    spatial_merge_size: int = 2,
) -> np.ndarray:
    """Positions [3, L] int32 of STAR's editing sequence (STAR_SPEC section 4).

    Sequence: E[:insert_at] ++ [vs] ++ VQ block (num_vq_tokens) ++ [ve] ++ [vs] ++ ViT block ++ [ve]
    ++ ["\\n"] ++ E[insert_at:], where E is the embedded chat prompt of `prompt_len` tokens. The VQ
    block is 1-D like text; the ViT block (merged grid of `vit_grid_thw`) gets (t, h, w) positions;
    text after it restarts at max + 1. L = prompt_len + num_vq_tokens + 5 + t * h/m * w/m.
    """
    if not 0 <= insert_at <= prompt_len:
        raise ValueError(f"insert_at={insert_at} must be within the prompt (prompt_len={prompt_len})")
    segments = [
        (TEXT, insert_at + 1 + num_vq_tokens + 1 + 1),  # E[:insert_at], vs, VQ block, ve, vs
        (IMAGE, tuple(vit_grid_thw)),
        (TEXT, 1 + 1 + prompt_len - insert_at),  # ve, "\n", E[insert_at:]
    ]
    return layout_positions(segments, spatial_merge_size).astype(np.int32)


def next_positions(positions: np.ndarray, num_new: int) -> np.ndarray:
    """1-D positions [3, B, num_new] int32 of tokens generated after `positions` [3, B, T]:
    max(position) + 1, + 2, ... per row (the decode continuation of an M-RoPE prompt)."""
    start = np.asarray(positions).max(axis=(0, 2)) + 1  # [B]
    new = start[:, None] + np.arange(num_new)[None]
    return np.broadcast_to(new[None], (3, *new.shape)).astype(np.int32)
