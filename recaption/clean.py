"""Caption cleaning and degenerate-output detection.

``clean`` strips boilerplate openings ("The image shows..."), collapses whitespace and
cuts at a token budget on a sentence boundary (CLIP reads 77 tokens, T5 256 or more).
``degenerate`` names what is wrong with an output that must not be stored: empty, a
repetition loop, a refusal, or the prompt echoed back.
"""

from __future__ import annotations

import re
from typing import Callable

BOILERPLATE = re.compile(
    r"^\s*(?:(?:the|this|an?)\s+)?(?:image|picture|photo(?:graph)?|illustration|scene|frame|drawing)\s+"
    r"(?:shows|depicts|features|contains|displays|presents|captures|is\s+of|is\s+showing|illustrates)\s*[:,]?\s*"
    r"|^\s*in\s+(?:this|the)\s+(?:image|picture|photo(?:graph)?|illustration|scene)\s*,?\s*"
    r"|^\s*(?:here\s+is|this\s+is)\s+(?:an?\s+)?(?:image|picture|photo(?:graph)?)\s+(?:of|showing)\s+",
    re.I)
REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i cannot|i can'?t|i am unable|i'?m unable|as an ai|i'?m not able|"
    r"cannot (?:help|assist) with)\b", re.I)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def strip_boilerplate(text: str) -> str:
    out = BOILERPLATE.sub("", text, count=1)
    return out[:1].upper() + out[1:] if out else out


def collapse_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def word_count(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def clip_token_counter() -> Callable[[str], int]:
    """Tokens as CLIP's BPE counts them (open_clip's tokenizer ships its vocabulary)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    return lambda text: len(tok.encode(text)) + 2  # start and end tokens


def truncate(text: str, budget: int, count: Callable[[str], int] = word_count) -> str:
    """The longest prefix of whole sentences within ``budget`` tokens; if even the first
    sentence is longer, its longest prefix of whole words (ending with a full stop)."""
    if count(text) <= budget:
        return text
    kept = ""
    for sentence in SENTENCE_END.split(text):
        candidate = f"{kept} {sentence}".strip()
        if count(candidate) > budget:
            break
        kept = candidate
    if kept:
        return kept
    words, out = text.split(), ""
    for w in words:
        candidate = f"{out} {w}".strip()
        if count(candidate + ".") > budget:
            break
        out = candidate
    return out.rstrip(",;:") + "." if out else ""


def repetition_loop(text: str, n: int = 3, times: int = 3) -> bool:
    """True when an n-gram of words repeats ``times`` or more, or a word makes up half the text."""
    words = re.findall(r"\w+", text.lower())
    if len(words) >= 6 and max(words.count(w) for w in set(words)) / len(words) >= 0.5:
        return True
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) >= times for g in set(grams))


def echoes_prompt(text: str, prompt: str) -> bool:
    t, p = collapse_whitespace(text).lower(), collapse_whitespace(prompt).lower()
    if not t or not p:
        return False
    if p in t or (len(t) > 20 and t in p):
        return True
    tw, pw = set(re.findall(r"\w+", t)), set(re.findall(r"\w+", p))
    return len(tw) >= 5 and len(tw & pw) / len(tw) > 0.8


def degenerate(text: str, prompt: str, min_words: int = 3) -> str | None:
    """Why ``text`` must not be stored, or None when it is usable."""
    if not text.strip():
        return "empty"
    if len(re.findall(r"\w+", text)) < min_words:
        return "too_short"
    if REFUSAL.search(text):
        return "refusal"
    if echoes_prompt(text, prompt):
        return "prompt_echo"
    if repetition_loop(text):
        return "repetition"
    return None


def clean(text: str, budget: int, count: Callable[[str], int] = word_count) -> str:
    return truncate(strip_boilerplate(collapse_whitespace(text)), budget, count)
