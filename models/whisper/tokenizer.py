"""Whisper's byte-level BPE tokenizer over a Hugging Face `tokenizer.json`.

Whisper's vocabulary is the text tokens, then specials in a fixed order: `<|endoftext|>`,
`<|startoftranscript|>`, language tokens (`<|en|>` ...), `<|translate|>`,
`<|transcribe|>`, `<|startoflm|>`, `<|startofprev|>`, `<|nospeech|>` (called
`<|nocaptions|>` in older files), `<|notimestamps|>`, then 1501 timestamp tokens
`<|0.00|>` ... `<|30.00|>` in 20 ms steps. Some tokenizer.json files (e.g. CTranslate2's)
omit the timestamp tokens; their ids are computed here from `<|notimestamps|>`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer

TIMESTAMP_STEP = 0.02  # seconds per timestamp token
NUM_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
_LANG = re.compile(r"<\|([a-z]{2,3})\|>")


class WhisperTokenizer:
    """Encode/decode text and look up Whisper's special tokens.

    `multilingual` decides whether the start prompt carries language and task tokens;
    by default it is read off the vocabulary layout (multilingual models have 50257 text
    tokens, so `<|endoftext|>` is 50257; English-only ones 50256).
    """

    def __init__(self, tokenizer: Tokenizer, multilingual: bool | None = None) -> None:
        self._tok = tokenizer
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        self.translate = self._special("<|translate|>")
        self.transcribe = self._special("<|transcribe|>")
        self.sot_lm = self._special("<|startoflm|>")
        self.sot_prev = self._special("<|startofprev|>")
        no_speech = tokenizer.token_to_id("<|nospeech|>")
        self.no_speech = no_speech if no_speech is not None else self._special("<|nocaptions|>")
        self.timestamp_begin = self.no_timestamps + 1
        self.multilingual = self.eot >= 50257 if multilingual is None else multilingual
        # Language tokens sit between SOT and <|translate|>.
        self.languages: dict[str, int] = {}
        for token_id in range(self.sot + 1, self.translate):
            m = _LANG.fullmatch(tokenizer.id_to_token(token_id) or "")
            if m:
                self.languages[m.group(1)] = token_id

    @classmethod
    def from_file(cls, path: str | Path, multilingual: bool | None = None) -> WhisperTokenizer:
        """From `tokenizer.json`, or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path)), multilingual)

    def _special(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token}; is it a Whisper tokenizer?")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Model vocabulary size: text and special tokens plus the timestamp tokens."""
        return self.timestamp_begin + NUM_TIMESTAMPS

    def token_to_id(self, token: str) -> int:
        """Any token by its text, timestamps (`<|1.24|>`) included."""
        m = re.fullmatch(r"<\|(\d+\.\d\d)\|>", token)
        if m:
            return self.timestamp_token(float(m.group(1)))
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    def id_to_token(self, token_id: int) -> str:
        if token_id >= self.timestamp_begin:
            return f"<|{self.timestamp_seconds(token_id):.2f}|>"
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise KeyError(token_id)
        return token

    def timestamp_token(self, seconds: float) -> int:
        step = round(seconds / TIMESTAMP_STEP)
        if not 0 <= step < NUM_TIMESTAMPS:
            raise ValueError(f"timestamp {seconds} s is outside 0..30 s")
        return self.timestamp_begin + step

    def timestamp_seconds(self, token_id: int) -> float:
        return (token_id - self.timestamp_begin) * TIMESTAMP_STEP

    def language_token(self, language: str) -> int:
        if language not in self.languages:
            raise KeyError(f"unknown language code {language!r}")
        return self.languages[language]

    def sot_sequence(
        self, language: str | None = None, task: str = "transcribe", timestamps: bool = False
    ) -> list[int]:
        """The decoder prompt: SOT [, language, task] [, <|notimestamps|>].

        English-only models take no language/task tokens; multilingual ones default to
        English transcription when `language` is None.
        """
        seq = [self.sot]
        if self.multilingual:
            if task not in ("transcribe", "translate"):
                raise ValueError(f"task must be 'transcribe' or 'translate', not {task!r}")
            seq.append(self.language_token(language or "en"))
            seq.append(self.transcribe if task == "transcribe" else self.translate)
        if not timestamps:
            seq.append(self.no_timestamps)
        return seq

    def encode(self, text: str) -> list[int]:
        """Text tokens only (no prompt, no EOT)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; specials and timestamps dropped unless `skip_special_tokens` is False."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._tok.decode([i for i in ids if i < self.eot], skip_special_tokens=False)
        # Timestamp tokens may be unknown to the file: decode runs of text between them.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i >= self.timestamp_begin:
                parts.append(self._tok.decode(run, skip_special_tokens=False))
                parts.append(self.id_to_token(i))
                run = []
            else:
                run.append(i)
        parts.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(parts)

    def split_to_word_tokens(self, ids: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Groups text tokens into words: a new word starts at a token beginning with a
        space, and punctuation stands alone. For space-delimited languages only. Tokens
        that hold parts of one character (byte-level pieces) stay in one group, so the
        words joined give the decoded text."""
        words: list[str] = []
        groups: list[list[int]] = []
        text_ids = [int(i) for i in ids if int(i) < self.eot]
        pending: list[int] = []
        for k, token_id in enumerate(text_ids):
            pending.append(token_id)
            piece = self._tok.decode(pending, skip_special_tokens=False)
            if "\ufffd" in piece and k + 1 < len(text_ids):
                continue  # a character split across tokens: wait for its other bytes
            if not groups or piece.startswith(" ") or _is_punct(piece) or _is_punct(words[-1]):
                words.append(piece)
                groups.append(pending)
            else:
                words[-1] += piece
                groups[-1].extend(pending)
            pending = []
        return words, groups


def _is_punct(text: str) -> bool:
    text = text.strip()
    return bool(text) and all(c in string.punctuation for c in text)
