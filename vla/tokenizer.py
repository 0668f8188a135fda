"""The nano backbone's tokenizer: word level over the instructions' vocabulary, built here (no hub).

It is a real `PreTrainedTokenizerFast`, saved beside the weights, so the artifact loads it with
`AutoTokenizer.from_pretrained(dir)` exactly as it would a SmolVLM tokenizer.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<image>", "<fake_token_around_image>"]
BASE_WORDS = """a an the to of on in into onto up down left right top bottom front back pick place put
push pull press open close shut stack lift move grab take drop cube block plate bin bowl drawer
button red green blue yellow white black orange purple then and it"""


def build_tokenizer(instructions) -> PreTrainedTokenizerFast:
    words = set(BASE_WORDS.split())
    for text in instructions:
        words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=SPECIAL[2:])
