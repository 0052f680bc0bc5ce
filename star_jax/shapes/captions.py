"""Text about shapes-world scenes: GenEval prompts + metadata, free-form captions, QA and edits.

GenEval's six tasks follow its `prompts/create_prompts.py` grammar and metadata exactly
(`with_article`, `make_plural`, number words, counting excludes count + 1, position targets the
first include). Free-form captions describe a whole scene; their metadata (tag `free_form`) pins
every class count. Questions have one exact answer (a number word, colour, shape, relation, yes or
no). Edits (recolour, remove, add with a relation, move) come with the edited scene.

Every function takes `split`: in 'train'/'validation' no text names a held-out pair or triple
(scenes are already free of them, see `scene.allowed`); in 'heldout' the text is built around one.
"""

from __future__ import annotations

import re

import numpy as np

from star_jax.shapes.scene import (
    COLORS,
    DEFAULT_WORLD,
    RELATIONS,
    SHAPES,
    Obj,
    Scene,
    WorldConfig,
    allowed,
    clear_relations,
    random_pair,
    sample_scene,
    unclear_relations,
)

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
EDIT_KINDS = ("recolor", "remove", "add", "move")
QA_KINDS = ("count", "color", "shape", "position", "existence")


def with_article(name: str) -> str:
    """GenEval's article rule: 'an' before a vowel."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    """GenEval's plural rule: 'es' after an s."""
    return f"{name}es" if name[-1] in "s" else f"{name}s"


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _is_heldout_triple(a: str, rel: str, b: str, config: WorldConfig) -> bool:
    return (a, rel, b) in config.triples


# ----------------------------------------------------------------------------- GenEval prompts


def geneval_example(
    rng: np.random.Generator, tag: str, config: WorldConfig = DEFAULT_WORLD, split: str = "train"
) -> tuple[Scene, dict]:
    """A scene and its GenEval metadata {"tag", "include", "exclude"?, "prompt"} for one of the six tags.

    In the 'heldout' split the scene (and, for colors/color_attr/position, the prompt) holds a
    held-out pair or triple.
    """
    heldout = split == "heldout"
    if tag == "single_object":
        color, shape = random_pair(rng, config, heldout=heldout)
        scene = sample_scene(rng, config, kinds=[(color, shape)], split=split)
        return scene, {
            "tag": tag,
            "include": [{"class": shape, "count": 1}],
            "prompt": f"a photo of {with_article(shape)}",
        }
    if tag == "two_object":
        a, b = rng.choice(SHAPES, size=2, replace=False).tolist()
        first = random_pair(rng, config, heldout=True) if heldout else (None, a)
        a = first[1]
        b = b if b != a else _pick(rng, [s for s in SHAPES if s != a])
        scene = sample_scene(rng, config, kinds=[(first[0], a), (None, b)], split=split)
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        return scene, {"tag": tag, "include": include, "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}
    if tag == "counting":
        shape = _pick(rng, SHAPES)
        num = int(rng.integers(2, 4, endpoint=True))
        kinds = [(None, shape)] * num
        if heldout:
            kinds[0] = random_pair(rng, config, heldout=True)
            shape = kinds[0][1]
            kinds = [kinds[0]] + [(None, shape)] * (num - 1)
        scene = sample_scene(rng, config, kinds=kinds, split=split)
        meta = {
            "tag": tag,
            "include": [{"class": shape, "count": num}],
            "exclude": [{"class": shape, "count": num + 1}],
            "prompt": f"a photo of {NUMBERS[num]} {make_plural(shape)}",
        }
        return scene, meta
    if tag == "colors":
        color, shape = random_pair(rng, config, heldout=heldout)
        scene = sample_scene(rng, config, kinds=[(color, shape)], split=split)
        meta = {"tag": tag, "include": [{"class": shape, "count": 1, "color": color}]}
        return scene, {**meta, "prompt": f"a photo of {with_article(color)} {shape}"}
    if tag == "position":
        while True:
            a, b = rng.choice(SHAPES, size=2, replace=False).tolist()
            rel = _pick(rng, RELATIONS)
            if _is_heldout_triple(a, rel, b, config) == heldout:
                break
        scene = sample_scene(rng, config, kinds=[(None, a), (None, b)], relation=(0, rel, 1), split=split)
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
        return scene, {
            "tag": tag,
            "include": include,
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}",
        }
    if tag == "color_attr":
        while True:
            first = random_pair(rng, config, heldout=heldout)
            second = random_pair(rng, config)
            if first[0] != second[0] and first[1] != second[1]:
                break
        scene = sample_scene(rng, config, kinds=[first, second], split=split)
        include = [{"class": s, "count": 1, "color": c} for c, s in (first, second)]
        prompt = f"a photo of {with_article(first[0])} {first[1]} and {with_article(second[0])} {second[1]}"
        return scene, {"tag": tag, "include": include, "prompt": prompt}
    raise ValueError(f"tag: unknown GenEval tag {tag!r}")


# ----------------------------------------------------------------------------- free-form captions


def scene_metadata(scene: Scene, prompt: str = "", tag: str = "free_form") -> dict:
    """GenEval-schema metadata that holds exactly for `scene`: each shape's count (and its colour when all
    objects of that shape share one), and excludes for one more of each shape / any absent shape."""
    include, exclude = [], []
    for shape in SHAPES:
        colors = [o.color for o in scene.objects if o.shape == shape]
        if colors:
            req = {"class": shape, "count": len(colors)}
            if len(set(colors)) == 1:
                req["color"] = colors[0]
            include.append(req)
        exclude.append({"class": shape, "count": len(colors) + 1 if colors else 1})
    return {"tag": tag, "include": include, "exclude": exclude, "prompt": prompt}


def _noun_phrase(color: str | None, shape: str, count: int) -> str:
    words = ([color] if color else []) + [shape if count == 1 else make_plural(shape)]
    head = " ".join(words)
    return with_article(head) if count == 1 else f"{NUMBERS[count]} {head}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, rng: np.random.Generator, config: WorldConfig = DEFAULT_WORLD) -> tuple[str, dict]:
    """A free-form caption of the whole scene and its metadata (tag 'free_form').

    Objects are grouped by (colour, shape), e.g. "a photo of two red circles and a blue square"; a
    scene of two different shapes may instead be captioned by their clear relation, e.g.
    "a red circle left of a blue square" (never a held-out triple).
    """
    prefix = _pick(rng, ("a photo of ", "an image of ", "a picture of ", ""))
    objs = scene.objects
    if len(objs) == 2 and objs[0].shape != objs[1].shape and rng.random() < 0.5:
        a, b = objs
        rels = [r for r in sorted(clear_relations(a, b)) if not _is_heldout_triple(a.shape, r, b.shape, config)]
        if rels:
            rel = _pick(rng, rels)
            text = f"{prefix}{with_article(a.color + ' ' + a.shape)} {rel} {with_article(b.color + ' ' + b.shape)}"
            meta = scene_metadata(scene, text)
            meta["include"] = [
                {"class": b.shape, "count": 1, "color": b.color},
                {"class": a.shape, "count": 1, "color": a.color, "position": [rel, 0]},
            ]
            return text, meta
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    parts = [_noun_phrase(c, s, n) for (c, s), n in groups.items()]
    text = prefix + _join(parts)
    return text, scene_metadata(scene, text)


# ----------------------------------------------------------------------------- questions


def refer(scene: Scene, index: int, rng: np.random.Generator | None = None) -> str | None:
    """A definite description ('the red circle' or 'the circle') that picks out object `index` only, or None."""
    o = scene.objects[index]
    same_kind = sum(x.shape == o.shape and x.color == o.color for x in scene.objects)
    same_shape = sum(x.shape == o.shape for x in scene.objects)
    if same_shape == 1 and (rng is None or rng.random() < 0.5 or same_kind > 1):
        return f"the {o.shape}"
    return f"the {o.color} {o.shape}" if same_kind == 1 else None


def question(
    rng: np.random.Generator,
    scene: Scene,
    config: WorldConfig = DEFAULT_WORLD,
    split: str = "train",
    kind_weights: tuple[float, ...] | None = None,
) -> tuple[str, str, str]:
    """A question about `scene` with its exact answer: (question, answer, kind), kind in QA_KINDS.

    Answers: number words for counts, a colour, a shape, a relation ('left of', ...), 'yes' or 'no'.
    Outside the 'heldout' split no question names a held-out pair or triple. The kind is drawn
    uniformly, or with `kind_weights` (one per QA_KINDS entry, any positive scale).
    """
    objs = scene.objects
    pairs = set(config.heldout_pairs) if split != "heldout" else set()
    p = None if kind_weights is None else np.asarray(kind_weights, np.float64) / np.sum(kind_weights)
    for _ in range(100):
        kind = _pick(rng, QA_KINDS) if p is None else QA_KINDS[int(rng.choice(len(QA_KINDS), p=p))]
        if kind == "count":
            shape = _pick(rng, SHAPES)
            mode = int(rng.integers(3))
            if mode == 0:
                return "how many objects are there?", NUMBERS[len(objs)], kind
            if mode == 1:
                n = sum(o.shape == shape for o in objs)
                return f"how many {make_plural(shape)} are there?", NUMBERS[n], kind
            color = _pick(rng, COLORS)
            if (color, shape) in pairs:
                continue
            n = sum(o.shape == shape and o.color == color for o in objs)
            return f"how many {color} {make_plural(shape)} are there?", NUMBERS[n], kind
        if kind == "color":
            i = int(rng.integers(len(objs)))
            if sum(o.shape == objs[i].shape for o in objs) == 1:
                return f"what color is the {objs[i].shape}?", objs[i].color, kind
        if kind == "shape":
            i = int(rng.integers(len(objs)))
            if sum(o.color == objs[i].color for o in objs) == 1:
                return f"what shape is the {objs[i].color} object?", objs[i].shape, kind
        if kind == "existence":
            if rng.random() < 0.5:
                o = objs[int(rng.integers(len(objs)))]
                color, shape, answer = o.color, o.shape, "yes"
            else:
                color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
                answer = "yes" if any(o.color == color and o.shape == shape for o in objs) else "no"
            if (color, shape) in pairs:
                continue
            return f"is there {with_article(color)} {shape}?", answer, kind
        if kind == "position" and len(objs) >= 2:
            i, j = rng.choice(len(objs), size=2, replace=False).tolist()
            ref_a, ref_b = refer(scene, i, rng), refer(scene, j, rng)
            if ref_a is None or ref_b is None:
                continue
            clear, loose = clear_relations(objs[i], objs[j]), unclear_relations(objs[i], objs[j])
            rel = _pick(rng, RELATIONS)
            if split != "heldout" and _is_heldout_triple(objs[i].shape, rel, objs[j].shape, config):
                continue
            if rng.random() < 0.5 and len(clear) == 1 and clear == loose:
                (rel,) = clear
                return f"where is {ref_a} relative to {ref_b}?", rel, kind
            if rel in clear or rel not in loose:
                return f"is {ref_a} {rel} {ref_b}?", "yes" if rel in clear else "no", kind
    return "how many objects are there?", NUMBERS[len(objs)], "count"


def grounding_question(
    rng: np.random.Generator, scene: Scene, config: WorldConfig = DEFAULT_WORLD, split: str = "train"
) -> tuple[str, str, str] | None:
    """Where one object is: ("where in the image is the red circle?", "(3, 7)", "grounding"), the
    answer its centre in tenths of the image side (x from the left, then y from the top; digits 0-9,
    a point as Qwen-VL writes one), or None when no object has a unique description. Qwen-VL's
    grounding data in miniature: a training-stream question (data.grounding_fraction) that teaches
    looking an object's place up by its name, which position questions compose. Held-out pairs are
    not named outside 'heldout'."""
    pairs = set(config.heldout_pairs) if split != "heldout" else set()
    for i in rng.permutation(len(scene.objects)).tolist():
        o = scene.objects[i]
        ref = refer(scene, i, rng)
        if ref is None or (o.color, o.shape) in pairs:
            continue
        return f"where in the image is {ref}?", point(o), "grounding"
    return None


def point(obj: Obj) -> str:
    """An object's centre as a grounding answer writes it: "(x, y)" in tenths of the image side, x
    from the left, then y from the top (digits 0-9)."""
    x, y = (min(max(int(v * 10), 0), 9) for v in (obj.x, obj.y))
    return f"({x}, {y})"


_REFERENCE = rf"the (?:(?:{'|'.join(COLORS)}) )?(?:{'|'.join(SHAPES)})"
_POSITION_QUESTION = re.compile(
    rf"(?:is|where is) ({_REFERENCE}) (?:{'|'.join(RELATIONS)}|relative to) ({_REFERENCE})\?"
)


def referent(scene: Scene, reference: str) -> Obj:
    """The one object of `scene` that a definite description ('the circle', 'the red circle') picks
    out; ValueError when none or several do."""
    *color, shape = reference.removeprefix("the ").split()
    found = [o for o in scene.objects if o.shape == shape and (not color or o.color == color[0])]
    if len(found) != 1:
        raise ValueError(f"reference: {reference!r} picks out {len(found)} objects of the scene, not one")
    return found[0]


def reason_about_position(scene: Scene, question: str, answer: str) -> str | None:
    """A position question's answer with its grounding first, or None for any other question:
    ("is the red circle left of the square?", "no") -> "(3, 7) (6, 2): no", the two named objects'
    `point`s in the question's order, then the answer. Intermediate supervision for the comparison
    the plain answer leaves implicit: each point is a grounding answer, and the relation follows
    from the two points (a table of the offset between them answers 0.986 of held-out position
    questions: tests/test_shapes.py)."""
    match = _POSITION_QUESTION.fullmatch(question)
    if match is None:
        return None
    a, b = (referent(scene, ref) for ref in match.groups())
    return f"{point(a)} {point(b)}: {answer}"


_REASONED_POINTS = re.compile(r"\((\d), (\d)\) \((\d), (\d)\):")


def reasoned_points(reply: str) -> tuple[int, int, int, int] | None:
    """The two `point`s a reasoned reply starts with, (x_a, y_a, x_b, y_b) in tenths, or None when it
    does not start with two points and a ':' (the inverse of `reason_about_position`'s prefix)."""
    match = _REASONED_POINTS.match(reply.strip())
    return None if match is None else tuple(int(d) for d in match.groups())


def final_answer(text: str) -> str:
    """The answer a reply ends with: what follows its last ':' ("(3, 7) (6, 2): no" -> "no"), or the
    whole reply, stripped. Replies that reason first (`reason_about_position`) are scored by it."""
    return text.rpartition(":")[2].strip()


def question_form(question: str) -> str:
    """The template of a shapes-world question, its names replaced: "how many red circles are
    there?" -> "how many <colour> <shapes> are there?", "is the circle left of the red square?" ->
    "is <object> <relation> <object>?" (any reference, "the circle" or "the red circle", is
    <object> in position and grounding questions). Evaluation groups answers by it."""
    import re

    words = []
    for word in question.rstrip("?").split():
        if word in COLORS:
            word = "<colour>"
        elif word in SHAPES:
            word = "<shape>"
        elif word in {make_plural(s) for s in SHAPES}:
            word = "<shapes>"
        words.append(word)
    form = " ".join(words)
    form = re.sub(r"\b(left of|right of|above|below)\b", "<relation>", form)
    form = re.sub(r"\ban <colour>", "a <colour>", form)
    if "<relation>" in form or " relative to " in form or form.startswith("where in the image"):
        form = re.sub(r"the (<colour> )?<shape>", "<object>", form)
    return form + ("?" if question.endswith("?") else "")


# ----------------------------------------------------------------------------- edits


def _relocate(rng, obj: Obj, others: list[Obj], anchor: Obj, rel: str, config: WorldConfig) -> Obj | None:
    """`obj` moved (same size) to a free spot where it is clearly `rel` the anchor (vectorised over 512 tries)."""
    half = obj.size / 2
    lo, hi = half + config.margin / 2, 1 - half - config.margin / 2
    if lo >= hi:
        return None
    centres = rng.uniform(lo, hi, size=(512, 2))
    ok = np.ones(len(centres), bool)
    for o in others:  # Chebyshev gap to every other box >= margin
        gap = np.abs(centres - [o.x, o.y]) - half - o.size / 2
        ok &= gap.max(axis=1) >= config.margin
    # GenEval's relation with the safety margin of `clear_relations` (threshold 0.15, cut 0.6).
    offset = centres - [anchor.x, anchor.y]
    revised = np.maximum(np.abs(offset) - 0.15 * (obj.size + anchor.size), 0) * np.sign(offset)
    unit = revised / np.maximum(np.linalg.norm(offset, axis=1, keepdims=True), 1e-9)
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[rel]
    ok &= sign * unit[:, axis] > 0.6
    hits = np.flatnonzero(ok)
    if not len(hits):
        return None
    x, y = centres[hits[0]]
    return Obj(obj.shape, obj.color, float(x), float(y), obj.size)


def edit(
    rng: np.random.Generator, scene: Scene, config: WorldConfig = DEFAULT_WORLD, split: str = "train"
) -> tuple[str, Scene, str] | None:
    """An edit instruction for `scene`: (instruction, edited scene, kind) with kind in EDIT_KINDS, or None.

    Outside 'heldout' both scenes are `allowed` and the text names no held-out pair or triple; in
    'heldout' the edit is a recolour or an add that creates a held-out pair.
    """
    objs = list(scene.objects)
    heldout = split == "heldout"
    feasible = [
        k
        for k in (("recolor", "add") if heldout else EDIT_KINDS)
        if not (k in ("remove", "move") and len(objs) < 2) and not (k == "add" and len(objs) >= config.max_objects)
    ]
    first = _pick(rng, feasible)  # the kind is drawn once, so hard kinds are not crowded out by easy ones
    for attempt in range(60):
        kind = first if attempt < 40 else _pick(rng, feasible)
        i = int(rng.integers(len(objs)))
        ref = refer(scene, i, rng)
        if ref is None:
            continue
        if kind == "recolor":
            shape = objs[i].shape
            if heldout:
                options = [c for c, s in config.heldout_pairs if s == shape and c != objs[i].color]
            else:
                options = [c for c in COLORS if (c, shape) not in config.heldout_pairs and c != objs[i].color]
            if not options:
                continue
            color = _pick(rng, options)
            target = scene.replace(i, color=color)
            text = _pick(rng, (f"make {ref} {color}", f"change the color of {ref} to {color}"))
        elif kind == "remove":
            if len(objs) < 2:
                continue
            target = scene.without(i)
            text = _pick(rng, (f"remove {ref}", f"delete {ref}"))
        elif kind == "add":
            if len(objs) >= config.max_objects:
                continue
            color, shape = random_pair(rng, config, heldout=heldout)
            rel = _pick(rng, RELATIONS)
            if not heldout and _is_heldout_triple(shape, rel, objs[i].shape, config):
                continue
            size = float(rng.uniform(config.min_size, config.max_size))
            new = _relocate(rng, Obj(shape, color, 0.5, 0.5, size), objs, objs[i], rel, config)
            if new is None:
                continue
            target = scene.with_object(new)
            text = f"add {with_article(color)} {shape} {rel} {ref}"
        else:  # move object j next to the anchor i
            if len(objs) < 2:
                continue
            j = int(_pick(rng, [k for k in range(len(objs)) if k != i]))
            ref_j, rel = refer(scene, j, rng), _pick(rng, RELATIONS)
            if ref_j is None or rel in unclear_relations(objs[j], objs[i]):
                continue
            if _is_heldout_triple(objs[j].shape, rel, objs[i].shape, config):
                continue
            others = [o for k, o in enumerate(objs) if k != j]
            moved = _relocate(rng, objs[j], others, objs[i], rel, config)
            if moved is None:
                continue
            target = scene.replace(j, x=moved.x, y=moved.y)
            text = f"move {ref_j} {rel} {ref}"
        if heldout or allowed(target, config):
            return text, target, kind
    return None
