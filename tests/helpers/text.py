"""Word error rate as every test that reads transcripts measures it."""

from __future__ import annotations


def normalize(text: str) -> str:
    """Whisper's English normalizer (numbers, spelling, punctuation, case)."""
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()(text)


def wer(refs: list[str], hyps: list[str]) -> float:
    """WER of the joined hypotheses against the joined references, both normalized."""
    import jiwer

    return float(jiwer.wer(normalize(" ".join(refs)), normalize(" ".join(hyps))))
