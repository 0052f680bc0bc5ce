"""big_vision-style helpers for sweep files: lists of override dicts, combined.

hyper.product([hyper.sweep("train.lr", [1e-4, 3e-4]), hyper.sweep("model.star.stack_layers", [2, 4])])
-> 4 dicts, every combination; `zipit` pairs lists element by element instead.
"""

import itertools


def sweep(key, values):
    """[{key: v} for v in values]."""
    return [{key: v} for v in values]


def fixed(key, value):
    """[{key: value}]: one setting shared by every run of a product."""
    return [{key: value}]


def product(lists):
    """Every combination of one dict from each list, merged left to right (later keys win)."""
    out = []
    for combo in itertools.product(*lists):
        merged = {}
        for d in combo:
            merged.update(d)
        out.append(merged)
    return out


def zipit(lists):
    """The i-th dicts of every list merged; raises ValueError naming the lengths when they differ."""
    lengths = [len(x) for x in lists]
    if len(set(lengths)) > 1:
        raise ValueError(f"zipit: lists of different lengths {lengths}")
    return [dict(kv for d in group for kv in d.items()) for group in zip(*lists)]
