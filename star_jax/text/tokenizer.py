"""Tokenizers: the built-in word-level one of the shapes world, and a wrapper of a Hugging Face tokenizer.json.

Both expose one interface: `encode(text) -> list[int]`, `decode(ids) -> str`, `special(name) -> int`,
`vocab_size`, `pad_id` (`<|endoftext|>`, as in Qwen). Qwen's special tokens are named tokens of
both, so chat templates and the CFG unconditional row (STAR_SPEC section 3) are written once.

The built-in vocabulary is a fixed list (ids never move when the shapes world grows; a test checks
that every text the world produces is covered). Words are split on whitespace and punctuation;
a newline is a token of its own, so Qwen's chat template ends in
`<|im_start|>`, `assistant`, `\\n` like Qwen's tokenizer does.
"""

from __future__ import annotations

import re

from etils import epath

QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|fim_pad|>",
)
UNK = "<unk>"
NEWLINE = "\n"
PUNCTUATION: tuple[str, ...] = (".", ",", "?", "!", ":", ";", "-", "'", '"', "(", ")")
DIGITS: tuple[str, ...] = tuple("0123456789")

# Fixed word list: append only (ids are positions). Grouped for reading.
# fmt: off
WORDS: tuple[str, ...] = (
    # chat template
    "system", "user", "assistant", "You", "are", "a", "helpful",
    # numbers
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    # colours and shapes (star_jax.shapes.COLORS / SHAPES), singular and plural
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "circle", "circles", "square", "squares", "triangle", "triangles", "diamond", "diamonds", "cross", "crosses",
    "star", "stars", "hexagon", "hexagons", "shape", "shapes", "object", "objects", "color", "colors",
    # captions
    "an", "photo", "of", "image", "picture", "and", "the", "with", "on", "in", "background", "scene", "there",
    "is", "left", "right", "above", "below", "next", "to", "small", "large", "big", "medium",
    # questions and answers
    "how", "many", "what", "where", "which", "relative", "yes", "no", "not", "none", "answer", "question",
    # edits
    "make", "change", "remove", "delete", "add", "move", "recolor", "replace", "put", "it", "into", "by",
    # instructions to the model
    "describe", "draw", "generate", "edit", "this", "that", "please", "count", "word",
    # plural suffixes ("builtin-stems": triangles -> triangle + s)
    "s", "es",
)
# fmt: on
# Plural nouns that "builtin-stems" encodes as stem + suffix, so the plural shares the singular's
# embedding (as a subword tokenizer's pieces would): the shapes, and the nouns questions count.
STEMMED: dict[str, tuple[str, str]] = {
    plural: (plural[: -len(suffix)], suffix)
    for plural, suffix in (
        ("circles", "s"),
        ("squares", "s"),
        ("triangles", "s"),
        ("diamonds", "s"),
        ("crosses", "es"),
        ("stars", "s"),
        ("hexagons", "s"),
        ("shapes", "s"),
        ("objects", "s"),
        ("colors", "s"),
    )
}  # fmt: skip


class BuiltinTokenizer:
    """Word-level tokenizer of the shapes world: Qwen specials first (ids 0-7), then `<unk>`, newline,
    punctuation, digits (one token each) and WORDS; vocab_size < 512 (configs/sizes.py SHAPES_VOCAB).

    stems=True ("builtin-stems"): the plural nouns of STEMMED encode as their singular + a suffix
    token ("triangles" -> "triangle", "s"), and decode glues the suffix back on."""

    _PATTERN = re.compile(r"<\|[a-z_]+\|>|\n|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]")

    def __init__(self, stems: bool = False):
        self.stems = stems
        self.tokens: list[str] = [*QWEN_SPECIALS, UNK, NEWLINE, *PUNCTUATION, *DIGITS, *WORDS]
        self.ids: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise AssertionError("duplicate token in the built-in vocabulary")
        self.unk_id = self.ids[UNK]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.ids["<|endoftext|>"]

    def special(self, name: str) -> int:
        """Id of a special token, e.g. special('<|vision_start|>')."""
        if name not in QWEN_SPECIALS and name not in (UNK, NEWLINE):
            raise ValueError(f"special: unknown special token {name!r}; expected one of {QWEN_SPECIALS}")
        return self.ids[name]

    def split(self, text: str) -> list[str]:
        """The token strings of `text` (spaces and tabs separate words and are dropped)."""
        pieces = self._PATTERN.findall(text)
        if not self.stems:
            return pieces
        return [part for piece in pieces for part in STEMMED.get(piece, (piece,))]

    def unknown_words(self, text: str) -> list[str]:
        """Pieces of `text` that would encode to `<unk>`."""
        return [t for t in self.split(text) if t not in self.ids]

    def encode(self, text: str, *, strict: bool = False) -> list[int]:
        """Token ids of `text`; unknown words become `<unk>` (or raise ValueError when strict)."""
        pieces = self.split(text)
        if strict and (unknown := [t for t in pieces if t not in self.ids]):
            raise ValueError(f"text: unknown words {unknown} in {text!r}")
        return [self.ids.get(t, self.unk_id) for t in pieces]

    def decode(self, ids) -> str:
        """Text of token ids: words joined by one space; none next to specials, newlines, punctuation
        (except an opening '(' or quote) or between digits. decode(encode(t)) == t for normalised text."""
        out: list[str] = []
        prev = None
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"ids: {i} is outside the vocabulary [0, {len(self.tokens)})")
            tok = self.tokens[i]
            glued = (
                prev is None
                or tok in QWEN_SPECIALS
                or tok == NEWLINE
                or prev in QWEN_SPECIALS
                or prev == NEWLINE
                or prev == "("
                or (tok in PUNCTUATION and tok != "(")
                or (tok in DIGITS and prev in DIGITS)
                or (self.stems and tok in ("s", "es") and prev in WORDS)
            )
            out.append(tok if glued else " " + tok)
            prev = tok
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. Qwen2.5's) behind the built-in tokenizer's interface."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        file = epath.Path(path)  # a local path or a bucket URL (a workdir's own copy)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer: no tokenizer.json at {str(file)!r}")
        self.path = str(file)
        self._tok = Tokenizer.from_str(file.read_text())

    @property
    def vocab_size(self) -> int:
        """1 + the largest id (Qwen2.5: 151665; its models pad the embedding to 151936)."""
        return 1 + max(self._tok.get_vocab(with_added_tokens=True).values())

    @property
    def pad_id(self) -> int:
        return self.special("<|endoftext|>")

    def special(self, name: str) -> int:
        """Id of a special token from the file (151652 for Qwen's '<|vision_start|>')."""
        i = self._tok.token_to_id(name)
        if i is None:
            raise ValueError(f"special: {name!r} is not a token of {self.path}")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added; special tokens in the text are recognised)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        """Text of token ids, special tokens kept."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def write_builtin_tokenizer_json(path: str) -> str:
    """Writes the built-in vocabulary (`BuiltinTokenizer()`, without stems) as a Hugging Face
    `tokenizer.json` at `path`: a WordLevel model with the same ids, Qwen's specials as special
    tokens and the same splitting (words, digits, punctuation and newlines; spaces dropped), so
    `HFTokenizer(path).encode(t) == BuiltinTokenizer().encode(t)`. Used to ship the shapes world's
    tokenizer with an exported model and by the tests' Hugging Face directories. Returns `path`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    builtin = BuiltinTokenizer()
    tok = Tokenizer(models.WordLevel(dict(builtin.ids), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]"), behavior="isolated"),
        ]
    )
    tok.add_special_tokens(list(QWEN_SPECIALS))
    tok.save(path)
    return path


def load_tokenizer(name: str = "builtin"):
    """'builtin' / 'builtin-stems' -> BuiltinTokenizer (stems=False / True); a tokenizer.json (or a
    directory holding one) -> HFTokenizer."""
    if name in ("builtin", "builtin-stems"):
        return BuiltinTokenizer(stems=name == "builtin-stems")
    return HFTokenizer(name)
