"""The CTC vocabulary: a Hugging Face `Wav2Vec2CTCTokenizer` folder read without
transformers (the pad token is the CTC blank, `|` separates words)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.checkpoint import ModelLoadError


@dataclasses.dataclass(frozen=True)
class CTCVocab:
    """Id → token string for a CTC head; `tokens[blank_id]` is the blank (HF's pad)."""

    tokens: tuple[str, ...]
    blank_id: int
    unk_token: str = "<unk>"
    word_delimiter: str | None = "|"
    replace_word_delimiter_char: str = " "
    do_lower_case: bool = False

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def word_delimiter_id(self) -> int | None:
        if self.word_delimiter is None or self.word_delimiter not in self.tokens:
            return None
        return self.tokens.index(self.word_delimiter)

    @classmethod
    def from_dict(
        cls,
        vocab: dict[str, int],
        *,
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        word_delimiter: str | None = "|",
        replace_word_delimiter_char: str = " ",
        do_lower_case: bool = False,
        added_tokens: dict[int, str] | None = None,
    ) -> CTCVocab:
        """From a flat `{token: id}` map (plus added tokens `{id: token}` for ids the map
        lacks); ids missing from both read as `unk_token`, as in transformers."""
        id_to_token = {int(i): t for i, t in (added_tokens or {}).items()}
        id_to_token.update({int(i): t for t, i in vocab.items()})  # vocab wins, as in HF
        if pad_token not in vocab:
            raise ValueError(f"the pad/blank token {pad_token!r} is not in the vocabulary")
        size = max(id_to_token) + 1
        tokens = tuple(id_to_token.get(i, unk_token) for i in range(size))
        return cls(
            tokens=tokens,
            blank_id=vocab[pad_token],
            unk_token=unk_token,
            word_delimiter=word_delimiter,
            replace_word_delimiter_char=replace_word_delimiter_char,
            do_lower_case=do_lower_case,
        )

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        *,
        target_lang: str | None = None,
        word_delimiter: str | None = None,
    ) -> CTCVocab:
        """Read `vocab.json`, `tokenizer_config.json` and `special_tokens_map.json` of a
        Hugging Face wav2vec2 folder. A nested (multilingual) vocab.json needs a language:
        `target_lang` here or in tokenizer_config.json. `word_delimiter` overrides the
        configured one."""
        folder = Path(path)
        vocab_file = folder / "vocab.json"
        if not vocab_file.is_file():
            raise ModelLoadError(
                f"{vocab_file} not found; expected a Hugging Face wav2vec2 CTC tokenizer "
                "folder with vocab.json (token → id) and tokenizer_config.json"
            )
        vocab = _read_json(vocab_file)
        config = _read_json(folder / "tokenizer_config.json", missing_ok=True)
        # transformers reads the legacy special_tokens_map.json only when the config has
        # no added_tokens_decoder, and then lets it override the config.
        if "added_tokens_decoder" not in config:
            special = _read_json(folder / "special_tokens_map.json", missing_ok=True)
            config.update({k: v for k, v in special.items() if v is not None})

        lang = target_lang if target_lang is not None else config.get("target_lang")
        vocab = _select_language(vocab, lang, vocab_file)

        added: dict[int, str] = {}
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            added[int(i)] = _token_text(entry)
        added_file = folder / "added_tokens.json"
        if added_file.is_file():
            added.update({int(i): t for t, i in _read_json(added_file).items()})

        pad = _token_text(config.get("pad_token", "<pad>"))
        if pad not in vocab:
            raise ModelLoadError(
                f"{vocab_file}: the pad token {pad!r} (the CTC blank, from "
                f"{folder / 'tokenizer_config.json'}) is not in the vocabulary"
            )
        delimiter = word_delimiter
        if delimiter is None:
            delimiter = _token_text(config.get("word_delimiter_token", "|"))
        return cls.from_dict(
            vocab,
            pad_token=pad,
            unk_token=_token_text(config.get("unk_token", "<unk>")),
            word_delimiter=delimiter,
            replace_word_delimiter_char=config.get("replace_word_delimiter_char", " "),
            do_lower_case=bool(config.get("do_lower_case", False)),
            added_tokens=added,
        )

    def token(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else self.unk_token

    def _piece(self, token_id: int) -> str:
        text = self.token(token_id)
        return self.replace_word_delimiter_char if text == self.word_delimiter else text

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of collapsed, blank-free token ids (what HF's decode gives for the frames)."""
        text = "".join(self._piece(int(i)) for i in token_ids).strip()
        return text.lower() if self.do_lower_case else text

    def is_delimiter(self, token_id: int) -> bool:
        return self.token(token_id) == self.word_delimiter


def _read_json(path: Path, missing_ok: bool = False) -> dict:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str:
    """Special tokens are saved as strings or as AddedToken dicts with `content`."""
    return value["content"] if isinstance(value, dict) else str(value)


def _select_language(vocab: dict, lang: str | None, vocab_file: Path) -> dict[str, int]:
    values = list(vocab.values())
    if all(isinstance(v, int) for v in values):
        return vocab
    if not all(isinstance(v, dict) for v in values):
        raise ModelLoadError(
            f"{vocab_file}: expected {{token: id}} or {{language: {{token: id}}}}, "
            "found a mix of both"
        )
    if lang is None:
        raise ModelLoadError(
            f"{vocab_file} is a multilingual vocabulary ({len(vocab)} languages, e.g. "
            f"{', '.join(list(vocab)[:5])}); set target_lang (argument or "
            "tokenizer_config.json) to pick one"
        )
    if lang not in vocab:
        raise ModelLoadError(
            f"{vocab_file}: language {lang!r} not found; it has {len(vocab)}: "
            f"{', '.join(sorted(vocab)[:20])}{', ...' if len(vocab) > 20 else ''}"
        )
    return vocab[lang]
