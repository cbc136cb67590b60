"""ChatGLM-6B tokenizer: SentencePiece `ice_text.model` plus THUDM's text conventions.

Gives the same ids as THUDM's `ChatGLMTokenizer` under transformers 4.2x, which it replaces:
- newlines become `<n>`, tabs `<|tab|>`, runs of 2..80 spaces `<|blank_N|>` before SentencePiece;
- the literal special tokens the transformers layer knew about (`<sop> <eop> <unk> <pad> [MASK]`) are
  cut out of user text first and whitespace next to them is stripped, as transformers did by default;
  `[gMASK]` was not registered there, so literal `[gMASK]` text goes through SentencePiece as text;
- every SentencePiece id is shifted by `num_image_tokens` (tokenizer_config.json);
- `decode` undoes the whitespace tokens and applies transformers' default clean-up of spaces before
  punctuation, which chat responses go through.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece

MAX_BLANK_LENGTH = 80
TAB_TOKEN = "<|tab|>"


def blank_token(length: int) -> str:
    return f"<|blank_{length}|>"


def encode_whitespace(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", TAB_TOKEN)
    for length in range(MAX_BLANK_LENGTH, 1, -1):
        text = text.replace(" " * length, blank_token(length))
    return text


def decode_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace(TAB_TOKEN, "\t")
    for length in range(2, MAX_BLANK_LENGTH + 1):
        text = text.replace(blank_token(length), " " * length)
    return text


def clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`, applied by its `decode` by default."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class ChatGLMTokenizer:
    def __init__(self, vocab_file: str | Path, num_image_tokens: int = 20000,
                 bos_token: str = "<sop>", eos_token: str = "<eop>", mask_token: str = "[MASK]",
                 gmask_token: str = "[gMASK]", pad_token: str = "<pad>", unk_token: str = "<unk>",
                 do_lower_case: bool = False, remove_space: bool = False):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.bos_id = self.piece_id(bos_token)
        self.eos_id = self.piece_id(eos_token)
        self.mask_id = self.piece_id(mask_token)
        self.gmask_id = self.piece_id(gmask_token)
        self.pad_id = self.piece_id(pad_token)
        # The special tokens transformers cut out of text before tokenizing (gMASK was not one of them).
        self.special_tokens = {t: self.piece_id(t) for t in (bos_token, eos_token, unk_token, pad_token, mask_token)}
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, self.special_tokens)) + ")")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ChatGLMTokenizer":
        model_dir = Path(model_dir)
        settings = {}
        config_file = model_dir / "tokenizer_config.json"
        if config_file.is_file():
            raw = json.loads(config_file.read_text(encoding="utf-8"))
            keys = ("num_image_tokens", "bos_token", "eos_token", "mask_token", "gmask_token", "pad_token",
                    "unk_token", "do_lower_case", "remove_space")
            settings = {k: raw[k] for k in keys if raw.get(k) is not None}
        return cls(model_dir / "ice_text.model", **settings)

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.get_piece_size()

    def piece_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece) + self.num_image_tokens

    def id_piece(self, token_id: int) -> str:
        if token_id < self.num_image_tokens:
            return f"<image_{token_id}>"
        return self.sp.id_to_piece(token_id - self.num_image_tokens)

    def _split_specials(self, text: str) -> list[str]:
        """Cut literal special tokens out; strip whitespace on both sides of each, as transformers did."""
        parts = [p for p in self._special_pattern.split(text) if p]
        for i, part in enumerate(parts):
            if part in self.special_tokens:
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
        return parts

    def _encode_text(self, text: str) -> list[int]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        pieces = self.sp.encode_as_pieces(encode_whitespace(text))
        return [self.sp.piece_to_id(p) + self.num_image_tokens for p in pieces]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without the prompt suffix."""
        ids: list[int] = []
        for part in self._split_specials(text):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_text(part))
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids the model is prompted with: the text, then `[gMASK]` and `<sop>` (generation starts after)."""
        return self.encode(text) + [self.gmask_id, self.bos_id]

    def build_prompt(self, query: str, history: list | None = None) -> list[int]:
        return self.encode_prompt(build_chat_prompt(query, history))

    def decode(self, ids: list[int]) -> str:
        pieces = [self.id_piece(i) for i in ids if i != self.pad_id]
        if not pieces:
            return ""
        return clean_up_spaces(decode_whitespace(self.sp.decode_pieces(pieces)))


def build_chat_prompt(query: str, history: list | None = None) -> str:
    """THUDM's chat prompt: the bare query without history, else numbered rounds of 问/答."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


_CJK = r"[\u4e00-\u9fff]"
_FULL_WIDTH = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))


def process_response(response: str) -> str:
    """THUDM's response post-processing: strip, fill the training date, full-width punctuation by CJK."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_mark in _FULL_WIDTH:
        mark = re.escape(ascii_mark)
        response = re.sub(rf"({_CJK}){mark}", rf"\1{full_mark}", response)
        response = re.sub(rf"{mark}({_CJK})", rf"{full_mark}\1", response)
    return response
