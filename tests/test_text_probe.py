"""star_jax.eval.text_probe: the position questions it trains on, and a short run on the tiny size."""

import numpy as np

from star_jax.eval import text_probe
from star_jax.shapes import captions
from star_jax.text import tokenizer


def test_examples_write_the_points_and_target_only_the_answer():
    tok = tokenizer.load_tokenizer("builtin")
    plain = text_probe.position_examples("validation", 60, with_points=False)
    reasoned = text_probe.position_examples("validation", 60, with_points=True)
    assert len(plain) == len(reasoned) == 60
    for (p_ids, p_len, p_ans), (r_ids, r_len, r_ans) in zip(plain, reasoned):
        assert p_ans == r_ans and p_ans in ("yes", "no", *captions.RELATIONS)
        assert p_ids[p_len:] == r_ids[r_len:] == tok.encode(p_ans) + [tok.special("<|im_end|>")]
        assert r_ids[:p_len] == p_ids[:p_len]  # the same prompt, then the points
        assert captions.reasoned_points(tok.decode(r_ids[p_len:r_len])) is not None
    ids, targets = text_probe.pack(reasoned, 64, tok.pad_id)
    first = np.argmax(targets >= 0, axis=1)
    assert [tok.decode([ids[i, first[i] + 1]]) for i in range(5)] == [a.split()[0] for *_, a in reasoned[:5]]


def test_a_short_run_learns_and_reports_the_prior():
    rows = text_probe.run(steps=30, with_points=True, size="tiny", lr=3e-3, num_train=600, num_val=64, eval_every=30)
    assert [r["step"] for r in rows] == [0, 30]
    assert 0.4 < rows[0]["prior"] < 0.8
    assert rows[0]["accuracy"] < 0.2  # an untrained decoder rarely names the answer's first token
    assert rows[1]["accuracy"] > 0.4 and np.isfinite(rows[1]["loss"])
