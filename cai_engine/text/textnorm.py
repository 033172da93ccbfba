"""One normalisation for every rule and check match: what a pattern sees, and how a match maps back to what was sent.

Someone trying to get a forbidden word or a number past a pattern respells it: zero-width spaces, joiners, soft hyphens
or word joiners inside it, full-width or mathematical letters, a Cyrillic or Greek look-alike letter, a combining
accent, a hyphenated line break, full-width or Arabic-Indic digits, dots or spaces between the digits. ``fold`` undoes
all of these: each character is decomposed (NFKD: compatibility forms become plain letters and digits), combining
marks and format characters are dropped, any decimal digit becomes its ASCII digit, and a letter Unicode lists as
confusable with a single Latin letter becomes that letter (Unicode's confusables data, as shipped by the
``confusable-homoglyphs`` package). ``digits=True`` also drops the separators inside a run of digits when every
separator in the run is the same single character, for number-like patterns (a card number written ``4.1.1.1 ...``
or ``4111 1111 ...``; a list of decimals such as ``12.5 13.0 14.5`` mixes two separators and keeps them).

Patterns are searched in the text as sent first (so a pattern written with accented letters still matches), then in
the folded views. Every character of the folded text remembers the span of the original it came from, so a match found in the folded
text is reported and repaired in the text the user actually sent.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from array import array
from dataclasses import dataclass
from typing import Any

# Between two digits, one of these may be dropped in the digits view ("4111 1111", "4.1.1.1", "4111-1111").
DIGIT_SEPARATORS = frozenset(" .-_/,\u00b7\u2022\u2219\u2027")
# A run of ASCII digits (folding has mapped every decimal digit to one) joined by single separators.
_DIGIT_RUN = re.compile("[0-9]+(?:[" + re.escape("".join(sorted(DIGIT_SEPARATORS))) + "][0-9]+)+")


@functools.cache
def _confusable_letters() -> dict[str, str]:
    """Non-ASCII characters Unicode lists as confusable with one ASCII letter, mapped to that letter."""
    from confusable_homoglyphs.utils import load

    out: dict[str, str] = {}
    for char, homoglyphs in load("confusables.json").items():
        if len(char) != 1 or char.isascii():
            continue
        for glyph in homoglyphs:
            target = glyph.get("c", "")
            if len(target) == 1 and target.isascii() and target.isalpha():
                out[char] = target
                break
    return out


# Characters that render as nothing or as blank space but are not Unicode format characters: Hangul fillers, the
# Braille blank, Mongolian vowel separator, combining grapheme joiner, variation selectors (Unicode's
# Default_Ignorable_Code_Point set, less the format characters dropped by category).
_INVISIBLE = frozenset(
    [
        *(0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180E, 0x180F, 0x2800, 0x3164, 0xFFA0),
        *range(0xFE00, 0xFE10),
        *range(0xE0100, 0xE01F0),
    ]
)
# "LATIN SMALL LETTER O WITH STROKE", "LATIN LETTER SMALL CAPITAL A", "MODIFIER LETTER SMALL H": the base letter
_LETTER_NAME = re.compile(r"^LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL |SMALL )?([A-Z])(?: WITH .*)?$")
_MODIFIER_NAME = re.compile(r"^MODIFIER LETTER (?:SMALL |CAPITAL )(?:CAPITAL )?([A-Z])$")


def _base_letter(char: str) -> str | None:
    """The Latin letter a non-ASCII Latin letter is a variant of (by its Unicode name), or None."""
    name = unicodedata.name(char, "")
    found = _LETTER_NAME.match(name) or _MODIFIER_NAME.match(name)
    if not found:
        return None
    letter = found.group(1)
    return letter if " CAPITAL LETTER " in f" {name} " and "SMALL CAPITAL" not in name else letter.lower()


def _fold_char(char: str, confusable: dict[str, str]) -> str:
    if char.isascii():
        return char
    if unicodedata.category(char) in ("Cf", "Me") or ord(char) in _INVISIBLE:  # zero-width, soft hyphen, BOM, ...
        return ""
    out = []
    for part in unicodedata.normalize("NFKD", char):
        if part.isascii():
            out.append(part)
        elif unicodedata.combining(part) or unicodedata.category(part) in ("Mn", "Me", "Cf") or ord(part) in _INVISIBLE:
            continue
        elif unicodedata.category(part) == "Nd":
            out.append(str(unicodedata.digit(part)))
        else:
            out.append(confusable.get(part) or _base_letter(part) or part)
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def is_dropped(char: str) -> bool:
    """Whether folding drops ``char`` entirely: a format or invisible character (zero-width space, soft hyphen, word
    joiner, variation selector, ...) or a combining mark. Such a character adds nothing a pattern can see."""
    return not char.isascii() and _fold_char(char, _confusable_letters()) == ""


@dataclass(frozen=True)
class Folded:
    """A folded text and, for each of its characters, the original span it came from (``starts``/``ends``, compact
    integer arrays; None for a view that is the original itself)."""

    original: str
    text: str
    starts: array[int] | None = None
    ends: array[int] | None = None

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span of the folded span ``[start, end)``."""
        if self.starts is None or self.ends is None:
            return start, end
        if start >= len(self.text):
            return len(self.original), len(self.original)
        if end <= start:
            return self.starts[start], self.starts[start]
        return self.starts[start], self.ends[end - 1]

    def original_of(self, match: Any) -> str:
        """What a match in the folded text covers in the original."""
        start, end = self.span(match.start(), match.end())
        return self.original[start:end]


def _hyphen_break(text: str, i: int) -> int:
    """The end of a hyphenated line break starting at ``i`` ("explo-\\n  sive"), or ``i`` when there is none.
    Characters folding drops may sit anywhere in it ("explo\\u200b-\\u200b\\n sive"); each scan covers only the
    break's own run, so folding stays linear."""
    if text[i] not in "-\u2010\u00ad":
        return i
    k = i - 1
    while k >= 0 and is_dropped(text[k]):
        k -= 1
    if k < 0 or not text[k].isalpha():
        return i
    j = _skip(text, i + 1, " \t\r")
    if j >= len(text) or text[j] != "\n":
        return i
    j = _skip(text, j + 1, " \t")
    return j if j < len(text) and text[j].isalpha() else i


def _skip(text: str, j: int, spaces: str) -> int:
    """The first index from ``j`` on that is neither one of ``spaces`` nor dropped by folding."""
    while j < len(text) and (text[j] in spaces or is_dropped(text[j])):
        j += 1
    return j


# Folded views are cached (every rule of a policy folds the same reply) only for texts up to this many characters, so
# the cache holds at most 256 x 16k characters' worth of views; a longer text is folded per call.
CACHED_CHARS = 16_384


def fold(text: str, digits: bool = False) -> Folded:
    """``text`` as patterns see it (see the module's docstring)."""
    if len(text) <= CACHED_CHARS:
        return _fold_cached(text, digits)
    return _fold_long(text, digits)


@functools.lru_cache(maxsize=2)
def _fold_long(text: str, digits: bool) -> Folded:
    """Long texts: only the last two views are kept (every rule folds the same long reply in turn)."""
    return _fold(text, digits)


@functools.lru_cache(maxsize=256)
def _fold_cached(text: str, digits: bool) -> Folded:
    return _fold(text, digits)


def _fold(text: str, digits: bool) -> Folded:
    if text.isascii() and "-" not in text and not digits:
        return Folded(text, text)  # nothing to fold: the original is its own view
    confusable = _confusable_letters()
    chars: list[str] = []
    starts = array("l")
    ends = array("l")
    i = 0
    while i < len(text):
        skip = _hyphen_break(text, i)
        if skip != i:
            i = skip
            continue
        for part in _fold_char(text[i], confusable):
            chars.append(part)
            starts.append(i)
            ends.append(i + 1)
        i += 1
    if digits:
        chars, starts, ends = _drop_digit_separators(chars, starts, ends)
    return Folded(text, "".join(chars), starts, ends)


def _drop_digit_separators(chars: list[str], starts: array[int], ends: array[int]) -> tuple[list[str], Any, Any]:
    """The folded characters without the separators between digits that spell one number.

    A run of digits whose separators are all one character loses them ("4111 1111 1111 1111", "4.1.1.1.1",
    "2026-12-04"). A run that mixes separators is read as space-separated items: an item with two separators or more,
    or with two kinds, loses them ("4111.1111.1111.1111 12" becomes "4111111111111111 12"), while an item with one
    ("12.5" in "12.5 13.0 14.5", a list of decimals) keeps it, so such a list is not read as one long number."""
    folded = "".join(chars)
    drop: set[int] = set()
    for run in _DIGIT_RUN.finditer(folded):
        text = run.group()
        if len({c for c in text if not c.isdigit()}) == 1:
            drop.update(run.start() + k for k, c in enumerate(text) if not c.isdigit())
            continue
        for item in _ITEM.finditer(text):
            marks = [k for k, c in enumerate(item.group()) if not c.isdigit()]
            if len(marks) >= 2:
                drop.update(run.start() + item.start() + k for k in marks)
    if not drop:
        return chars, starts, ends
    keep = [k not in drop for k in range(len(chars))]
    return (
        [c for c, ok in zip(chars, keep) if ok],
        array("l", (v for v, ok in zip(starts, keep) if ok)),
        array("l", (v for v, ok in zip(ends, keep) if ok)),
    )


_ITEM = re.compile("[^ ]+")


def number_like(pattern: str) -> bool:
    """Whether a pattern looks for digits (then it is also searched in the digits view)."""
    return "\\d" in pattern or "0-9" in pattern


def as_sent(text: str) -> Folded:
    """The text unchanged, as a view (a pattern written with accents or other non-ASCII letters matches here)."""
    return Folded(text, text)


def views(text: str, pattern: str) -> list[Folded]:
    """The views a pattern is searched in: as sent, folded, and for number-like patterns folded with the separators
    between digits dropped."""
    out = [as_sent(text)]
    for view in (fold(text), fold(text, digits=True)) if number_like(pattern) else (fold(text),):
        if all(view.text != seen.text for seen in out):  # plain ASCII text folds to itself: searched once
            out.append(view)
    return out


def search(compiled: Any, pattern: str, text: str) -> tuple[Any, Folded] | None:
    """The first match of a compiled pattern in any view of ``text``, with the view it was found in."""
    for view in views(text, pattern):
        match = compiled.search(view.text)
        if match:
            return match, view
    return None


def substitute(compiled: Any, pattern: str, text: str, replacement: str) -> str:
    """``text`` with every match (in any view) replaced by ``replacement``, edited in the original spelling."""
    steps = [as_sent, fold] + ([functools.partial(fold, digits=True)] if number_like(pattern) else [])
    for step in steps:
        view = step(text)
        if step is not as_sent and view.text == text:
            continue
        spans = sorted({view.span(m.start(), m.end()) for m in compiled.finditer(view.text)})
        if not spans:
            continue
        pieces, last = [], 0
        for start, end in spans:  # one pass: the text is rebuilt once, however many matches
            if start < last:
                continue
            pieces += [text[last:start], replacement]
            last = end
        text = "".join(pieces) + text[last:]
    return text
