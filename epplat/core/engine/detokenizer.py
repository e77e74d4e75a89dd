"""Incremental detokenization and stop-string matching for one request (frontend side)."""

from __future__ import annotations

from typing import Optional


def _decoder(tokenizer):
    """decode(ids, skip_special_tokens) -> str: the Rust tokenizer's own decode where
    ``tokenizer.decode`` adds nothing to it (a fast tokenizer without the clean-up pass),
    skipping transformers' per-call wrapping; else ``tokenizer.decode``."""
    from transformers import PreTrainedTokenizerFast
    rust = getattr(tokenizer, "_tokenizer", None)
    plain = (isinstance(tokenizer, PreTrainedTokenizerFast) and rust is not None
             and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
             and not getattr(tokenizer, "clean_up_tokenization_spaces", True))
    if plain:
        return lambda ids, skip: rust.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Decodes a sliding window (prefix_offset..) and holds text back while it ends in an
    incomplete UTF-8 sequence. Stop strings are searched in the text; while streaming,
    the last ``max(len(stop)) - 1`` characters are held back so a partial stop string
    never reaches the client.
    """

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False):
        self.decode = _decoder(tokenizer)
        self.skip = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0

    def add(self, token_ids: list[int], final: bool = False, check_stop: bool = True) -> Optional[str]:
        """Append tokens; returns the stop string if one matched (text is cut there).

        ``final`` flushes an incomplete UTF-8 tail as U+FFFD, as a full decode would; without
        ``check_stop`` the new text is not searched for stop strings.
        """
        self.ids.extend(token_ids)
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        new = self.decode(self.ids[self.prefix_offset:], self.skip)
        if len(new) <= len(prefix) or (new.endswith("\ufffd") and not final):
            return None
        old_len = len(self.text)
        self.text += new[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        for s in self.stop if check_stop else ():
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                self.text = self.text[: i + len(s) if self.include_stop else i]
                return s
        return None

    def delta(self, final: bool) -> str:
        """Text not yet sent; holds back a possible partial stop string unless final."""
        end = len(self.text) if final or not self.stop else max(self.sent, len(self.text) - self.holdback)
        out = self.text[self.sent:end]
        self.sent = end
        return out
