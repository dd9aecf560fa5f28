"""Offline CLIP tokenizer: exact ids of the real openai/clip-vit-large-patch14 tokenizer."""

from __future__ import annotations

import sys

import pytest

from gcfg_core.tokenizer import TokenizerUnavailableError, clip_bpe_path, clip_tokenizer


def test_ids_equal_the_real_clip_tokenizer():
    assert clip_tokenizer()("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_padding_and_length():
    tokenizer = clip_tokenizer()
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=77)["input_ids"]
    assert len(padded) == 77 and padded[7:] == [49407] * 70
    assert tokenizer.pad_token_id == 49407 and tokenizer.model_max_length == 77
    assert tokenizer("")["input_ids"] == [49406, 49407]


def test_long_prompt_token_count():
    ids = clip_tokenizer()("a photo of a cat, " * 20, add_special_tokens=False)["input_ids"]
    assert len(ids) == 120  # 6 tokens per repeat: a, photo, of, a, cat, ","
    assert ids[:6] == [320, 1125, 539, 320, 2368, 267]


def test_tokenizer_is_built_once():
    assert clip_tokenizer() is clip_tokenizer()


def test_bpe_file_is_found_without_importing_open_clip():
    path = clip_bpe_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.parent.name == "open_clip"
    assert "open_clip" not in sys.modules or getattr(sys.modules["open_clip"], "__file__", None) is None


def test_missing_bpe_file_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(TokenizerUnavailableError, match="open-clip-torch"):
        clip_bpe_path()
