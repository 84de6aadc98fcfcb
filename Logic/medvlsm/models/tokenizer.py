"""The exact OpenAI CLIP BPE tokenizer, built offline from the BPE table we ship.

``Resources/Tokenizers/clip/bpe_simple_vocab_16e6.txt.gz`` is OpenAI's table as distributed in
open_clip (MIT). The vocabulary is derived exactly as open_clip's ``SimpleTokenizer`` does, so a
model folder created here (``medvlsm init``) tokenizes like ``CIDAS/clipseg-rd64-refined``.
"""

from __future__ import annotations

import functools
import gzip

from ..resources import resource


def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict, list]:
    lines = gzip.open(resource("Tokenizers", "clip", "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` (49,408 tokens, 77 positions) with no download."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=77)
