"""Caption splitters for the segment-level (LongAlign) text encoder: ``str -> list[str]``.

* ``official``: exactly what LongAlign's code does
  (``tools.py``: ``collate_fn`` / ``caption2embed``)::

      pattern = re.compile(r'"!|\\.|\\?|;"')
      pieces = [s + '.' for s in re.split(pattern, caption) if len(s) > 0] or [caption]

  Note the stray double quotes inside that raw string: the alternatives are ``"!``, ``.``, ``?`` and
  ``;"``, so the official code splits on every ``.`` and ``?`` (also inside decimals, "3.5" ->
  "3." + "5."), but on ``!`` and ``;`` only when a double quote precedes/follows them. Every
  non-empty piece gets a "." appended (whitespace is kept: the CLIP tokenizer drops it), and a
  caption with no non-empty piece ("" or ".") is one segment, itself. We reproduce this, quirks
  included, because the default matches the official semantics.
* ``sentences``: split after ``.``, ``!`` or ``?`` followed by whitespace; pieces stripped,
  empty ones dropped.
* ``packed``: sentence boundaries that skip decimals and common abbreviations ("e.g.", "Mr.",
  "U.S.", initials), plus line breaks; consecutive sentences are then packed greedily into segments
  of at most 75 tokens (CLIP's 77 minus <sot>/<eot>), and a sentence longer than that is wrapped at
  word boundaries, so nothing is truncated unless a single word exceeds 75 tokens. Fewer, fuller
  segments also mean fewer <sot> rows in the conditioning.
"""

from __future__ import annotations

import re
from typing import Callable

Splitter = Callable[[str], list[str]]

# verbatim from LongAlign's tools.py, stray quotes included
OFFICIAL_PATTERN = re.compile(r'"!|\.|\?|;"')
MAX_SEGMENT_TOKENS = 75

# Words that end with "." without ending a sentence. "etc." and "no." are left out:
# they often do end one.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft vs cf approx fig figs e.g i.e incl dept gen col lt sgt capt"
    " rev hon ave blvd".split()
)
_DOTTED = re.compile(r"^(?:[a-z]\.){2,}$", re.IGNORECASE)  # e.g. i.e. U.S. a.m. p.m.
_INITIAL = re.compile(r"^[A-Z]\.$")  # J. R. R. Tolkien
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(\s+)")
_OPENERS = "\"'(\u201c\u2018["


def official_split(caption: str) -> list[str]:
    """LongAlign's split, verbatim (see the module docstring)."""
    pieces = [piece + "." for piece in re.split(OFFICIAL_PATTERN, caption) if len(piece) > 0]
    return pieces if pieces else [caption]


def sentence_split(caption: str) -> list[str]:
    """Split after '.', '!' or '?' followed by whitespace; strip; drop empty pieces."""
    return [piece.strip() for piece in re.split(r"(?<=[.!?])\s+", caption) if piece.strip()]


def _is_abbreviation(text: str, match: re.Match) -> bool:
    """Whether the boundary ``match`` is a lone "." closing an abbreviation rather than a
    sentence."""
    if text[match.start() : match.start(1)] != ".":
        return False
    words = text[: match.start() + 1].split()
    word = words[-1].lstrip(_OPENERS) if words else ""
    return (
        word[:-1].lower() in ABBREVIATIONS
        or bool(_DOTTED.match(word))
        or bool(_INITIAL.match(word))
    )


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: boundaries after [.!?] + whitespace (not after abbreviations), and
    line breaks. Decimals ("3.5") never split, since no whitespace follows their point."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        newline = "\n" in match.group(1)
        if not newline and _is_abbreviation(text, match):
            continue
        sentences.append(text[start : match.start(1)])
        start = match.end(1)
    sentences.append(text[start:])
    # line breaks without punctuation are boundaries too
    lines = (line.strip() for sentence in sentences for line in sentence.splitlines())
    return [line for line in lines if line]


class PackedSplitter:
    """Sentences (see ``split_sentences``) packed greedily into segments of at most ``max_tokens``
    tokens.

    Token counts come from ``tokenizer`` without special tokens. A segment's count is taken as the
    sum of its parts' counts: exact for CLIP, whose BPE never merges across whitespace (a test
    checks every packed segment by re-tokenizing it). A sentence over ``max_tokens`` is wrapped at
    word boundaries.
    """

    def __init__(self, tokenizer, max_tokens: int = MAX_SEGMENT_TOKENS):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def _counts(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [
            len(ids)
            for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
        ]

    def _pack(self, pieces: list[str], counts: list[int]) -> list[str]:
        segments, current, used = [], [], 0
        for piece, n in zip(pieces, counts):
            if current and used + n > self.max_tokens:
                segments.append(" ".join(current))
                current, used = [], 0
            current.append(piece)
            used += n
        if current:
            segments.append(" ".join(current))
        return segments

    def __call__(self, caption: str) -> list[str]:
        sentences = split_sentences(caption)
        units, unit_counts = [], []
        for sentence, n in zip(sentences, self._counts(sentences)):
            if n <= self.max_tokens:
                units.append(sentence)
                unit_counts.append(n)
            else:  # wrap an over-long sentence at word boundaries, then pack it like any other
                words = sentence.split()
                units.extend(self._pack(words, self._counts(words)))
                unit_counts.extend(self._counts(units[len(unit_counts) :]))
        return self._pack(units, unit_counts)


SPLITTERS = {"official": official_split, "sentences": sentence_split}


def resolve_splitter(splitter: str | Splitter, tokenizer=None) -> Splitter:
    """A splitter by name (``official``, ``sentences``, ``packed``) or any callable
    ``str -> list[str]``."""
    if callable(splitter):
        return splitter
    if splitter == "packed":
        if tokenizer is None:
            raise ValueError("the 'packed' splitter counts tokens: it needs the tokenizer")
        return PackedSplitter(tokenizer)
    if splitter in SPLITTERS:
        return SPLITTERS[splitter]
    raise ValueError(
        f"unknown splitter {splitter!r}; expected one of "
        f"{sorted([*SPLITTERS, 'packed'])} or a callable str -> list[str]"
    )
