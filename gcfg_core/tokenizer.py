"""Offline CLIP tokenizer for SD 1.x prompts, built from the BPE vocabulary that open-clip-torch ships.

The merges and vocabulary are reconstructed exactly as OpenAI's `simple_tokenizer.py` does
(github.com/openai/CLIP, `clip/simple_tokenizer.py`), so the ids equal those of
`openai/clip-vit-large-patch14`'s tokenizer without downloading it.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import pathlib
import sys
import tempfile

import transformers
from transformers.models.clip.tokenization_clip import bytes_to_unicode

logger = logging.getLogger("gcfg.tokenizer")

BPE_FILE = pathlib.Path("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
MODEL_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # simple_tokenizer.py: merges[1:49152-256-2+1]


class TokenizerUnavailableError(RuntimeError):
    """The CLIP BPE vocabulary file could not be found."""


def clip_bpe_path() -> pathlib.Path:
    """Path of open_clip's `bpe_simple_vocab_16e6.txt.gz`, found on `sys.path` without importing open_clip.

    Importing open_clip needs torchvision, and `importlib.util.find_spec` fails once a stub module is
    registered, so the file is looked up directly.
    """
    for entry in sys.path:
        candidate = pathlib.Path(entry or ".") / BPE_FILE
        if candidate.is_file():
            return candidate
    raise TokenizerUnavailableError(
        f"CLIP BPE vocabulary {BPE_FILE} not found on sys.path; install it with "
        "`pip install --no-deps open-clip-torch==2.20.0`"
    )


def _vocab_and_merges(bpe_path: pathlib.Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


@functools.cache
def clip_tokenizer() -> transformers.CLIPTokenizer:
    """The SD 1.x CLIP tokenizer (pads with EOS 49407, 77 tokens), built offline once per process."""
    vocab, merges = _vocab_and_merges(clip_bpe_path())
    # CLIPTokenizer reads both files in __init__, so they only need to live while it is built.
    with tempfile.TemporaryDirectory(prefix="gcfg-clip-tokenizer-") as folder:
        vocab_file = pathlib.Path(folder) / "vocab.json"
        merges_file = pathlib.Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges), encoding="utf-8")
        # transformers warns once that ftfy is missing; its BasicTokenizer fallback is what the WebUI gets too.
        tokenizer = transformers.CLIPTokenizer(
            str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=MODEL_MAX_LENGTH
        )
    if tokenizer.bos_token_id != BOS_TOKEN_ID or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise TokenizerUnavailableError(f"unexpected CLIP vocabulary in {clip_bpe_path()}: BOS/EOS ids differ")
    logger.debug("built CLIP tokenizer with %d tokens", len(vocab))
    return tokenizer
