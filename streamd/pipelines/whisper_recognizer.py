"""Per session policy of the `whisper` pipeline (streamd/pipelines/whisper.py): the
LocalAgreement state of the segment in flight and what its partials promise (`stable`),
the final computed early at a speech pause, how a fresh final keeps the stable words
(same words in another spelling, spliced, or decoded again with them forced), and the
session's previous text (context) with its guards. The device work goes through the
pipeline (`recognize`); this module never touches the engine's batches.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.whisper.decoding import repetitive
from models.whisper.transcriber import previous_text
from streamd.pipelines.stabilize import LocalAgreement
from streamd.recognizer import Hypothesis, RecognizerOptions, SegmentInfo

# Partials are best effort: one is only submitted while fewer requests than this wait in
# the engine queue, so under load finals do not queue behind partials of other sessions.
PARTIAL_QUEUE_LIMIT = 1
# Partials that must agree on a word before it is stable (LocalAgreement-n). Measured with
# bench/stability.py. Shared recordings: with 2, 7 of 29 finals had other words than their
# stable prefix (an early "S" forced "S-not!" for "Ask not!"), finals WER 5.07 %; with 3,
# 1 of 29 and 4.39 % (fresh finals: 5.07 %); 61 % (vs 86 %) of a final's words were stable
# before it came. Dev stream file (38 finals): with 2, 5 redone, 6.31 %; with 3, 3 redone,
# 5.99 % (fresh: 5.68 %); 62 % (vs 79 %) stable before the final.
STABLE_AGREEMENT = 3


# How far the fresh final's match of the last stable word may sit from the stable word
# count: a contraction or a number written out moves it by a word or two ("I'll" / "I
# will"); further off, the match is likelier another occurrence of a common word.
SPLICE_SHIFT = 2


def splice_point(stable: Sequence[str], fresh: Sequence[str]) -> int | None:
    """Where a fresh final goes on after the stable words (plain: lower case, no
    punctuation): the index in `fresh` after its match of the last stable word, when
    the two align there (difflib's longest matching blocks, in order) and the match is
    within SPLICE_SHIFT words of where it would be; None when they do not align (the
    final is then decoded again with the stable words forced)."""
    if not stable or not fresh:
        return None
    last = len(stable) - 1
    matcher = difflib.SequenceMatcher(None, list(stable), list(fresh), autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        if a <= last < a + size:
            after = b + (last - a) + 1
            return after if abs(after - len(stable)) <= SPLICE_SHIFT else None
    return None


@dataclasses.dataclass(frozen=True)
class _Final:
    """A final's hypothesis and what it adds to the session's context."""

    hyp: Hypothesis
    tokens: tuple[int, ...]  # the final's text tokens
    fell_back: bool  # decoded again without the previous text (the context is cleared)


class WhisperRecognizer:
    """Per session: LocalAgreement state of the segment in flight, the final computed
    early on a closing partial (`SegmentInfo.closing`), and the previous text (recent
    finals' tokens, newest last) that prompts its decodes."""

    # A periodic partial is one decode of the audio so far, which the final does not use
    # (it decodes afresh; a cancelled partial leaves the LocalAgreement state as a skipped
    # one does): the session may cancel it when the final is due (streamd/session.py).
    supersede_partials = True

    # pipeline: the WhisperPipeline (streamd/pipelines/whisper.py, which imports this).
    def __init__(self, pipeline: Any,
                 options: RecognizerOptions | None = None) -> None:
        options = options or RecognizerOptions()
        self.pipeline = pipeline
        self.policy: LocalAgreement[tuple[int, ...]] = LocalAgreement(STABLE_AGREEMENT)
        self._segment: int | None = None
        self._last_text: str | None = None
        # (segment index, start, samples) -> the final's hypothesis for exactly that audio
        self._early: tuple[tuple[int, float, int], _Final] | None = None
        self.context = pipeline.context if options.context is None else options.context
        self.initial = pipeline.prompt_tokens(options.prompt)
        self._previous: tuple[int, ...] = ()  # recent finals' tokens (context on)
        self._previous_end: float | None = None  # stream time the last of them ended

    def previous(self) -> tuple[int, ...]:
        """The prompt of the next decode: the session's `prompt`, then as many of the
        recent finals' tokens as fit (newest last)."""
        return previous_text(self.initial, self._previous, self.pipeline.context_tokens)

    def clear_context(self) -> None:
        """Forget the previous finals (the `prompt` stays). Called after a fallback, after
        a long silence, at a client's `finalize` (streamd.session.ClearContext) and at the
        end of the session."""
        self._previous, self._previous_end = (), None

    def _reset_after_silence(self, segment: SegmentInfo) -> None:
        end = self._previous_end
        if end is not None and segment.start - end > self.pipeline.context_reset_s:
            self.clear_context()

    def _remember(self, final: _Final, segment: SegmentInfo) -> None:
        if final.fell_back or not self.context or not final.tokens:
            return
        keep = self.pipeline.context_tokens
        self._previous = (self._previous + final.tokens)[-keep:]
        self._previous_end = segment.end

    def _enter(self, segment: int) -> None:
        if segment != self._segment:
            self.policy.reset()
            self._segment = segment
            self._last_text = None
            self._early = None

    async def partial(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        self._enter(segment.index)
        self._reset_after_silence(segment)
        p = self.pipeline
        if segment.closing:
            return await self._final_early(audio_16k, segment)
        if p.engine.queue_depth >= PARTIAL_QUEUE_LIMIT:
            p.partials_skipped += 1
            return None
        committed = self.policy.committed
        prefix = p.tokens(committed)
        previous = self.previous() if p.context_partials else ()
        result = await p.recognize(audio_16k, prefix, previous=previous)
        if result.silent and not prefix:
            return None
        # Generated words are grouped on their own, so committed units never regroup.
        hyp = p.cut_loop(list(committed) + p.words(result.tokens), len(committed))
        text = p.words_text(hyp)
        if repetitive(text):
            return None  # still repetitive: say nothing rather than commit to it
        room, units, used = p.prefix_room(len(audio_16k)), 0, 0
        # Never the last word: on audio cut mid-sentence it is often cut short or ends in
        # guessed punctuation ("ask what you can do."), and a committed period made the
        # final stop there (JFK lost "for your country").
        for word in hyp[:-1]:  # the most words whose tokens fit the decoder's prompt room
            if used + len(word) > room:
                break
            used, units = used + len(word), units + 1
        stable = self.policy.update(hyp, max_units=units)
        return self._say(Hypothesis(text, stable=p.words_text(stable)))

    def _say(self, hyp: Hypothesis) -> Hypothesis | None:
        if hyp.text == self._last_text:
            return None  # nothing new to say
        self._last_text = hyp.text
        return hyp

    async def _final_early(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        """The speech paused: decode the final now, during the rest of the endpoint wait.
        Skipped when the engine is busy (the endpoint's final then decodes as usual)."""
        if self.pipeline.engine.queue_depth >= PARTIAL_QUEUE_LIMIT:
            self.pipeline.partials_skipped += 1
            return None
        committed = self.policy.committed
        final = await self._decode_final(audio_16k, committed)
        self._early = ((segment.index, segment.start, len(audio_16k)), final)
        if not final.hyp.text:
            return None
        return self._say(Hypothesis(final.hyp.text, stable=self.pipeline.words_text(committed)))

    async def _decode_final(self, audio_16k: np.ndarray,
                            committed: tuple[tuple[int, ...], ...]) -> _Final:
        """The whole segment decoded afresh (no committed prefix forced): measured on the
        stream recording, forcing the partials' LocalAgreement prefix kept their early
        mistakes ("will be ever", "what you are country"): WER 6.1 % vs 4.1 % free.
        The final keeps what partials promised (the `committed`, stable, words): a fresh
        result that starts with the same words in another case or punctuation takes the
        stable spelling; one that starts with other words is decoded again with the
        stable words forced. With previous text, a decode that fails openai's checks is
        done again without it (and the context cleared)."""
        p = self.pipeline
        previous = self.previous()
        result = await p.recognize(audio_16k, (), final=True, previous=previous)
        fell_back = False
        if previous and result.fails(p.text(result.tokens)):
            p.context_fallbacks += 1
            fell_back, previous = True, ()
            self.clear_context()
            result = await p.recognize(audio_16k, (), final=True)
        words = [] if result.silent else p.cut_loop(p.words(result.tokens), 0)
        k = len(committed)
        stable, fresh = p.plain_words(committed), p.plain_words(words)
        after = splice_point(stable, fresh) if k else None
        if k and after == k and fresh[:k] == stable:
            # The same words, but for case or punctuation ("the" / "The", "him," / "him."):
            # the stable spelling stands, the fresh decode goes on after it.
            words = list(committed) + words[k:]
        elif after is not None:
            # Other words for the same speech ("I'll" / "I will", "zero" / "0"): the
            # stable words stand and the fresh decode goes on after its match of their
            # last word, with no second decode.
            p.finals_spliced += 1
            words = list(committed) + words[after:]
        elif k:
            p.finals_restabilized += 1
            result = await p.recognize(audio_16k, p.tokens(committed), final=True,
                                       previous=previous)
            words = p.cut_loop(list(committed) + p.words(result.tokens), k)
        if not words:  # not speech: nothing is published for the segment
            return _Final(Hypothesis(""), (), fell_back)
        return _Final(Hypothesis(p.words_text(words)), p.tokens(words), fell_back)

    async def final(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        early = self._early  # keyed by the audio it decoded: index, start and length
        committed = self.policy.committed
        self._segment, self._last_text, self._early = None, None, None
        self.policy.reset()
        if early is not None and early[0] == (segment.index, segment.start, len(audio_16k)):
            self.pipeline.finals_early += 1
            final = early[1]
        else:
            self._reset_after_silence(segment)
            final = await self._decode_final(audio_16k, committed)
        self._remember(final, segment)
        if self.pipeline.word_timestamps and final.tokens:
            words = await self.pipeline.timed_words(audio_16k, final.tokens, segment.start)
            return dataclasses.replace(final.hyp, words=words)
        return final.hyp

    def close(self) -> None:
        self.policy.reset()
        self._early = None
        self.clear_context()
