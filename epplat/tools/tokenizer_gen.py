"""A deterministic byte-level BPE tokenizer for random-weight test and demo checkpoints.

Trained when a checkpoint is made, on a corpus embedded here (English prose and code,
padded out with pseudo-words from a fixed integer generator so that large vocabularies
fill up too), so nothing is downloaded and the result is the same on every run. Saved
as tokenizer.json + tokenizer_config.json (with a ChatML chat template, as Qwen uses)
+ special_tokens_map.json, the form transformers' AutoTokenizer and vLLM load.
"""

from __future__ import annotations

import json
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL = [ENDOFTEXT, IM_START, IM_END]   # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_TEXT = r'''The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning they rowed out past the lighthouse, cast their nets, and waited for the tide to turn.
"Patience," the old man would say, "is the only bait that never runs out." She laughed at him,
but she learned to wait, and in the end she caught more fish than anyone in the harbour.

A mixture of experts is a neural network layer made of many small feed-forward networks, the experts,
and a router that sends every token to a few of them. The router scores each expert, keeps the top k,
and mixes their outputs with the normalised scores as weights. With expert parallelism the experts are
spread over many devices: tokens are dispatched to the ranks that hold their experts and combined again
after the experts have run. Load balancing moves popular experts so that no device waits for another.

Hello, world! How are you today? I am fine, thank you. What time is it? It is half past three.
Paris is the capital of France; Berlin is the capital of Germany; Tokyo is the capital of Japan.
Water boils at 100 degrees Celsius and freezes at 0 degrees. The speed of light is about 299,792 km/s.
In 1969, two astronauts walked on the Moon while a third orbited above them in the command module.
Mathematics is the language of science: 2 + 2 = 4, 3 * 7 = 21, 10 / 4 = 2.5, and 2 ** 10 = 1024.
Please summarise the following article in three sentences. Translate this paragraph into French.
You are a helpful assistant. Answer the question briefly and explain your reasoning step by step.
The weather will be sunny in the morning, with clouds and light rain arriving late in the afternoon.
She opened the window, looked at the garden, and decided that the roses needed water before lunch.
Good software is simple, tested and documented. Bad software is clever, untested and undocumented.
Naïve café owners in São Paulo serve crème brûlée; 你好，世界; こんにちは; Привет, мир; ¿Qué tal? — “quotes” €5.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b, out = 0, 1, []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out


class Router(nn.Module):
    def __init__(self, hidden_size, num_experts, top_k=2):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x):
        logits = self.gate(x)
        weights, ids = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids


if __name__ == "__main__":
    import sys
    print(fibonacci(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
    with open("results.json", "w") as f:
        json.dump({"status": "ok", "values": [1, 2, 3]}, f, indent=2)

{"model": "demo", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64, "temperature": 0.0}
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } return sum;
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC LIMIT 10;
$ pip install -e . && pytest -q tests/ && git commit -m "Fix the off-by-one error in the scheduler"
<html><body><p class="note">Hello &amp; welcome</p></body></html>
'''

_SYLLABLES = ("ka ri to mo se na lu pe vi da zo che shi qua ble tra ing ent ion er est ly ous al an re de co "
              "pro ex un in st th sh ch wh gr pl fr cl br sp ou ai ee oo ar or ur im om ag ed").split()


def corpus(vocab_size: int = 2048) -> list[str]:
    """The training lines: the text above, then pseudo-words enough to reach ``vocab_size``."""
    lines = _TEXT.splitlines() * 20
    n_words, x, words = max(30000, 12 * vocab_size), 12345, []
    for _ in range(n_words):
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64   # a fixed LCG: same on every platform
        k = 1 + (x >> 62)
        words.append("".join(_SYLLABLES[(x >> (8 * j + 8)) % len(_SYLLABLES)] for j in range(k)))
    return lines + [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]


def build_tokenizer(vocab_size: int = 2048):
    """A trained ``tokenizers.Tokenizer`` with at most ``vocab_size`` entries (specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 256 + len(SPECIAL):
        raise ValueError(f"vocab_size {vocab_size} is below the {256 + len(SPECIAL)} a byte-level BPE needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(vocab_size), trainer)
    return tok


def save_tokenizer(outdir, vocab_size: int = 2048, max_len: int = 4096) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; returns the special ids."""
    tok = build_tokenizer(vocab_size)
    outdir = Path(outdir)
    tok.save(str(outdir / "tokenizer.json"))
    specials = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "unk_token": None, **specials,
           "model_max_length": max_len, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
           "chat_template": CHAT_TEMPLATE}
    (outdir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (outdir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return {s: tok.token_to_id(s) for s in SPECIAL}
