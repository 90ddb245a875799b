"""Caption cleaning rules and degenerate-output detection, one by one."""

import pytest

from recaption.clean import (clean, clip_token_counter, collapse_whitespace, degenerate, echoes_prompt,
                             repetition_loop, strip_boilerplate, truncate, word_count)
from recaption.prompts import load_prompt

PROMPT = "Describe this image in detail: the main subject, the background, and the colours."


@pytest.mark.parametrize("raw,expect", [
    ("The image shows a red circle on a grey background.", "A red circle on a grey background."),
    ("This picture depicts two blue squares.", "Two blue squares."),
    ("In this image, a yellow star sits at the top.", "A yellow star sits at the top."),
    ("Here is a photo of a cat.", "A cat."),
    ("A photo shows nothing special", "Nothing special"),
    ("A red circle.", "A red circle."),
])
def test_strip_boilerplate(raw, expect):
    assert strip_boilerplate(raw) == expect


def test_collapse_whitespace():
    assert collapse_whitespace("  a \n\n red\tcircle  ") == "a red circle"


def test_truncate_at_sentence_boundary():
    text = "One red circle. Two blue squares at the top. A striped background with grey bars."
    assert truncate(text, 11) == "One red circle. Two blue squares at the top."  # punctuation counts
    assert truncate(text, 100) == text
    assert truncate("a very long first sentence without any end in sight at all", 6) == "a very long first sentence."


def test_clip_token_budget_is_77_real_tokens():
    count = clip_token_counter()
    text = " ".join(f"Sentence number {i} describes a small red circle." for i in range(40))
    out = truncate(text, 77, count)
    assert count(out) <= 77 < count(out + " Sentence number 99 describes a small red circle.")
    assert out.endswith(".")


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("   ", "empty"), ("red", "too_short"),
    ("I'm sorry, but I cannot describe this image.", "refusal"),
    ("As an AI language model I can't see images.", "refusal"),
    (PROMPT, "prompt_echo"),
    ("describe this image in detail the main subject the background and the colours", "prompt_echo"),
    ("red circle red circle red circle red circle red circle", "repetition"),
    ("a a a a a a a a blue", "repetition"),
    ("A small red circle at the top left, on a striped grey background.", None),
])
def test_degenerate(text, reason):
    assert degenerate(text, PROMPT) == reason


def test_repetition_and_echo_helpers():
    assert repetition_loop("the cat sat on the mat and the cat sat on the mat and the cat sat") is True
    assert repetition_loop("a red circle and a blue square and a green star") is False
    assert echoes_prompt("Describe this image in detail", PROMPT) is True


def test_clean_pipeline():
    raw = "The image shows   a red circle.\nIt sits on a grey background. It is small and round and shiny."
    assert clean(raw, 14, word_count) == "A red circle. It sits on a grey background."


def test_prompt_templates_are_versioned_and_render_hints():
    d, s = load_prompt("descriptive-v1"), load_prompt("short-v1")
    assert (d.ref, s.ref) == ("descriptive@1", "short@1")
    assert "Shiny red ball" in d.render("Shiny red ball", use_hint=True)
    assert d.render("Shiny red ball", use_hint=False) == d.text
    assert d.render("", use_hint=True) == d.text
    with pytest.raises(FileNotFoundError, match="known: descriptive-v1, short-v1"):
        load_prompt("poetic-v9")


def test_every_shipped_prompt_template_loads():
    from recaption.prompts import PROMPTS

    paths = sorted(PROMPTS.glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        t = load_prompt(str(path))
        assert path.stem == f"{t.id}-v{t.version}", f"{path.name}: file name must be ID-vVERSION.yaml"
