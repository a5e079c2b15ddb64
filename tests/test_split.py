"""Splitting long replies into platform messages."""

from __future__ import annotations

import pytest

from bot.split import split_message


def test_short_text_is_one_message():
    assert split_message("hello", 2000) == ["hello"]


def test_splits_at_line_then_word_boundaries_under_the_limit():
    text = "\n".join(f"line {n} " + "word " * 30 for n in range(100))
    chunks = split_message(text, 2000)
    assert len(chunks) > 1 and all(len(c) <= 2000 for c in chunks)
    assert all(c.startswith("line ") for c in chunks)  # cut at the end of a line, not inside one
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())


def test_never_cuts_inside_a_code_block_that_fits_a_message():
    code = "```python\n" + "\n".join(f"value_{n} = {n}" for n in range(60)) + "\n```"
    text = "Some prose. " * 100 + "\n" + code + "\nAfter."
    chunks = split_message(text, 2000)
    assert any(chunk.startswith("```python") and chunk.count("```") == 2 for chunk in chunks)
    assert all(chunk.count("```") % 2 == 0 for chunk in chunks)


def test_a_code_block_longer_than_a_message_is_closed_and_reopened():
    code = "```js\n" + "\n".join(f"let v{n} = {n};" for n in range(400)) + "\n```"
    chunks = split_message(code, 500)
    assert len(chunks) > 1 and all(len(c) <= 500 for c in chunks)
    assert all(c.startswith("```js") and c.rstrip().endswith("```") for c in chunks)


def test_a_word_longer_than_the_limit_is_cut_hard():
    chunks = split_message("x" * 5000, 2000)
    assert [len(c) for c in chunks] == [2000, 2000, 1000]


def test_refuses_a_useless_limit():
    with pytest.raises(ValueError):
        split_message("abc", 10)
