"""A deterministic byte-level BPE tokenizer for random-weight test and demo checkpoints.

Trained at creation time on a corpus built here (English and code snippets plus
pseudo-words from a seeded generator), so no file is downloaded; saved as
tokenizer.json + tokenizer_config.json with a ChatML chat template, in the form
transformers' AutoTokenizer (and vLLM) load.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_TEXT = """The quick brown fox jumps over the lazy dog. Once upon a time there was a mixture of experts,
and every expert was routed a share of the tokens. A router picks the top experts for each token;
the tokens travel to the ranks that hold those experts and come back weighted. Hello world!
def add(a, b):
    return a + b
import torch
for i in range(10):
    print(i, i * i)
class Model(nn.Module):
    def forward(self, x):
        return self.linear(x)
1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Numbers, letters, punctuation: ; : ? ! ( ) [ ] { } < > = + - * /
You are a helpful assistant. What is the capital of France? Paris is the capital of France.
"""

_SYLLABLES = ("ka ri to mo se na lu pe vi da zo che shi qua ble tra ing ent ion er est ly ous al "
              "an re de co pro ex un in st th sh ch wh gr pl fr cl br sp").split()


def corpus(n_words: int = 30000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = _TEXT.splitlines() * 20
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n_words)]
    lines += [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    return lines


def build_tokenizer(vocab_size: int = 2048):
    """A trained tokenizers.Tokenizer with exactly ``vocab_size`` entries (specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer training reached {tok.get_vocab_size()} entries, not {vocab_size}")
    return tok


def save_tokenizer(outdir: Path, vocab_size: int = 2048, max_len: int = 4096) -> dict:
    """Write the tokenizer files; returns the special token ids."""
    tok = build_tokenizer(vocab_size)
    outdir = Path(outdir)
    tok.save(str(outdir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": max_len, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (outdir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (outdir / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2))
    return {s: tok.token_to_id(s) for s in SPECIAL}
