"""Output cleaning: the same text whether fed whole or token by token."""

from __future__ import annotations

import random
from typing import Any

import pytest

from backends.text.cleaning import OutputCleaner, clean_output

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("Hello<|im_end|>", {"eos_to_cull": r"<\|im_end\|>"}, "Hello"),
    ("Hello</s>  \n", {"eos_to_cull": r"</s>\s*"}, "Hello"),
    ("a</s>b</s>", {"eos_to_cull": "</s>$"}, "a</s>b"),
    ("one </s> two </s>", {"eos_to_cull": "</s>"}, "one  two "),
    ("red, green. END and more", {"stop": ["END"]}, "red, green. "),
    ("red STOP green END", {"stop": ["END", "STOP"]}, "red "),
    ("no stop here", {"stop": ["x" * 20]}, "no stop here"),
    ("abc assistant\nfinal answer</s>", {"output_split_prefix": "assistant\n", "eos_to_cull": "</s>"}, "final answer"),
    ("x assistant\ny assistant\nz", {"output_split_prefix": "assistant\n"}, "z"),  # the last occurrence wins
    ("no prefix at all", {"output_split_prefix": "assistant\n"}, "no prefix at all"),  # only when present
]


@pytest.mark.parametrize(("raw", "options", "expected"), CASES)
def test_clean_output(raw: str, options: dict[str, Any], expected: str) -> None:
    assert clean_output(raw, **options) == expected


@pytest.mark.parametrize(("raw", "options", "expected"), CASES)
def test_streamed_pieces_concatenate_to_the_whole(raw: str, options: dict[str, Any], expected: str) -> None:
    rng = random.Random(7)
    for _ in range(100):
        cleaner, out, i = OutputCleaner(**options), "", 0
        while i < len(raw) and not cleaner.stopped:
            j = i + rng.randint(1, 4)
            out += cleaner.feed(raw[i:j])
            i = j
        assert out + cleaner.finish() == expected


def test_text_is_released_once_it_cannot_change() -> None:
    cleaner = OutputCleaner(stop=["END"], eos_to_cull=r"<\|im_end\|>")
    assert cleaner.feed("Hello wor") == "Hello wor"
    assert cleaner.feed("ld E") == "ld "  # "E" may start "END"
    assert cleaner.feed("x <|im") == "Ex "  # "<|im" may start the EOS token
    assert cleaner.feed("_end|>") == ""
    assert not cleaner.stopped
    assert cleaner.feed(" bye END tail") == " bye "
    assert cleaner.stopped
    assert cleaner.feed("more") == ""
    assert cleaner.raw == "Hello world Ex <|im_end|> bye "
