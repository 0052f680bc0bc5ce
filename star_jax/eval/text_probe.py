r"""Text-only probe of the position comparison: can a decoder of this size learn "is A left of B?"
when both objects' points are written in the prompt, with no image?

  python -m star_jax.eval.text_probe --steps 600 --points      # question + "(3, 7) (6, 2):" -> answer
  python -m star_jax.eval.text_probe --steps 600 --no-points   # question alone: the prior

Each example is a shapes-world position question ("is the red circle left of the square?", "where
is the circle relative to the triangle?") in the chat template; with `--points` the reply starts
with the two named objects' grounding points (`captions.reason_about_position`) and only the answer
after them is a target. A fresh decoder of `--size` trains on position questions alone
(`optim.make_optimizer` with the understanding stage's betas and clipping, cosine from `--lr`) and
reports, every `--eval_every` steps, the accuracy of the answer's first token on `--num_val`
validation questions (teacher-forced).
It separates the comparison from the image lookup that the understanding stage must learn first.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from star_jax import objectives, optim, sharding
from star_jax.models import qwen2
from star_jax.shapes import captions, splits
from star_jax.shapes.scene import DEFAULT_WORLD
from star_jax.text import chat, tokenizer

POSITION_ONLY = (0, 0, 0, 1, 0)  # question kind weights: position questions only (captions.QA_KINDS)


def position_examples(split: str, num: int, *, with_points: bool, seed: int = 0) -> list[tuple[list[int], int, str]]:
    """`num` position questions of `split` as (ids, prompt length, answer): ids [T] int token ids of
    the chat prompt (+ the two points and ':' when `with_points`) then the answer and `<|im_end|>`;
    the targets are ids[prompt length:]. Three questions per scene, scenes in index order."""
    tok = tokenizer.load_tokenizer("builtin")
    out, index = [], 0
    while len(out) < num:
        rng = splits.example_rng(split, index, "qa", seed)
        index += 1
        scene = splits._scene(rng, split, DEFAULT_WORLD)
        for _ in range(3):
            q, a, kind = captions.question(rng, scene, DEFAULT_WORLD, split, kind_weights=POSITION_ONLY)
            if kind != "position" or len(out) == num:
                continue
            prompt = chat.chat_prompt(q)
            if with_points:
                prompt += captions.reason_about_position(scene, q, a).rpartition(":")[0] + ":"
            p = tok.encode(prompt)
            out.append((p + tok.encode(a) + [tok.special("<|im_end|>")], len(p), a))
    return out


def pack(examples, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples -> (ids [N, length] int32, targets [N, length] int32: the next token where it is an
    answer token, -1 elsewhere). Raises naming the length when an example does not fit."""
    ids = np.full((len(examples), length), pad_id, np.int32)
    targets = np.full((len(examples), length), -1, np.int32)
    for row, (seq, prompt_len, _) in enumerate(examples):
        if len(seq) > length:
            raise ValueError(f"length: {length} is shorter than an example ({len(seq)} tokens)")
        ids[row, : len(seq)] = seq
        targets[row, prompt_len - 1 : len(seq) - 1] = seq[prompt_len:]
    return ids, targets


def _loss(model, ids, targets):
    return objectives.cross_entropy(model(ids), targets)[0]


@nnx.jit
def _train_step(model, optimizer, ids, targets):
    loss, grads = nnx.value_and_grad(_loss)(model, ids, targets)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _first_answer_correct(model, ids, targets):
    first = jnp.argmax(targets >= 0, axis=1)
    rows = jnp.arange(ids.shape[0])
    pred = jnp.argmax(model(ids)[rows, first], axis=-1)
    return pred == targets[rows, first]


def run(
    *,
    steps: int,
    with_points: bool,
    lr: float = 1e-3,
    batch_size: int = 32,
    size: str = "shapes",
    num_train: int = 40_000,
    num_val: int = 1_000,
    eval_every: int = 200,
    seed: int = 0,
    log=print,
) -> list[dict]:
    """Trains a fresh decoder of `size` on position questions; returns one row per evaluation,
    {"step", "loss" (the last training batch's, f32), "accuracy" (first answer token on the
    validation questions), "prior" (the most common validation answer's share among yes/no and
    among "where" questions, i.e. what answering from the question alone reaches)}."""
    from star_jax.configs import sizes

    tok = tokenizer.load_tokenizer("builtin")
    train = position_examples("train", num_train, with_points=with_points, seed=seed)
    val = position_examples("validation", num_val, with_points=with_points, seed=seed)
    length = max(len(s) for s, _, _ in train + val)
    train_ids, train_targets = pack(train, length, tok.pad_id)
    val_ids, val_targets = pack(val, length, tok.pad_id)
    answers = [a for *_, a in val]
    yes_no = [a for a in answers if a in ("yes", "no")]
    where = [a for a in answers if a not in ("yes", "no")]
    prior = sum(max(g.count(a) for a in set(g)) for g in (yes_no, where) if g) / len(answers)

    cfg = qwen2.DecoderConfig.from_dict(sizes.SIZES[size]["decoder"], dtype="float32")
    mesh = sharding.single_device_mesh()
    model = sharding.create_sharded(lambda: qwen2.Decoder(cfg, rngs=nnx.Rngs(seed)), mesh, sharding.DEFAULT_RULES)
    train_cfg = ml_collections.ConfigDict(
        dict(
            lr=lr, warmup_steps=10, num_steps=steps, schedule="cosine", b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0
        )
    )
    rng = np.random.default_rng(seed)
    rows, loss, start = [], float("nan"), time.time()
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        optimizer = nnx.Optimizer(model, optim.make_optimizer(train_cfg), wrt=nnx.Param)
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                correct = np.concatenate(
                    [
                        np.asarray(_first_answer_correct(model, val_ids[i : i + 256], val_targets[i : i + 256]))
                        for i in range(0, len(val), 256)
                    ]
                )
                rows.append({"step": step, "loss": loss, "accuracy": float(correct.mean()), "prior": prior})
                log(
                    f"step {step}: loss {loss:.4f}, accuracy {correct.mean():.3f} (prior {prior:.3f}), {time.time() - start:.0f} s"
                )
            if step == steps:
                break
            idx = rng.integers(0, len(train), batch_size)
            loss = float(_train_step(model, optimizer, train_ids[idx], train_targets[idx]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--points", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--size", default="shapes")
    parser.add_argument("--num_val", type=int, default=1000)
    parser.add_argument("--eval_every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(
        steps=args.steps,
        with_points=args.points,
        lr=args.lr,
        batch_size=args.batch_size,
        size=args.size,
        num_val=args.num_val,
        eval_every=args.eval_every,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
