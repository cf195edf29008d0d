"""CTC recognition of whole recordings with wav2vec2 / wav2vec2-conformer models:
offline (one forward over the utterance) or streamed chunk by chunk with cached state.

Any valid layout streams: chunk, left context and look-ahead are durations turned into
the model's own frames (`wav2vec2.StreamConfig.from_ms`); a chunk that is not a whole
number of output frames is rounded to the nearest one, with a warning."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from models import wav2vec2
from models.ctc.beam import beam_init, beam_results, beam_step, prefix_beam_search
from models.ctc.greedy import GreedyState, greedy_decode, greedy_result, greedy_step
from models.ctc.vocab import CTCVocab

log = logging.getLogger(__name__)

CHUNK_MS = 320  # streaming defaults, as durations (the frames depend on the layout)
LEFT_MS = 5120
RIGHT_MS = 320


class CTCTranscriber:
    """Greedy (beam_size 1) or prefix-beam CTC decoding of a Hugging Face CTC folder."""

    def __init__(self, folder: str | Path, beam_size: int = 1, chunk_ms: float = CHUNK_MS,
                 left_ms: float = LEFT_MS, right_ms: float = RIGHT_MS) -> None:
        """`chunk_ms`, `left_ms`, `right_ms`: streaming chunk, attention left context and
        look-ahead (see `wav2vec2.StreamConfig.from_ms` for the rounding). Raises
        ModelLoadError, or ValueError for a non-positive chunk or a negative context."""
        self.config, self.params, vocab_dir = wav2vec2.load(folder)
        self.vocab = CTCVocab.from_folder(vocab_dir)
        self.do_normalize = wav2vec2.extractor_normalizes(folder)
        self.beam_size = beam_size
        self.stream_config = wav2vec2.StreamConfig.from_ms(
            self.config, chunk_ms, left_ms, right_ms, normalize=self.do_normalize)
        frame_ms = self.config.frame_s * 1000
        if abs(self.chunk_ms - chunk_ms) > 1e-6:
            log.warning("a %g ms chunk is not a whole number of this model's %g ms frames; "
                        "streaming uses %g ms", chunk_ms, frame_ms, self.chunk_ms)
        self._stream_params = wav2vec2.prepare_stream(self.params, self.config,
                                                      self.stream_config)

    def _text(self, logits: np.ndarray) -> str:
        if self.beam_size > 1:
            return prefix_beam_search(logits, self.vocab, beam_width=self.beam_size)[0].text
        return greedy_decode(logits, self.vocab).text

    def transcribe(self, audio: np.ndarray) -> str:
        """One forward over the whole utterance (compiles once per audio length)."""
        audio = np.asarray(audio, np.float32)
        if self.do_normalize:
            audio = wav2vec2.normalize_audio(audio)
        logits = wav2vec2.forward(self.params, self.config, jnp.asarray(audio)[None], None)
        # One unpadded row: every output frame (encoder or adapter) is the utterance's.
        return self._text(np.asarray(logits[0]))

    def warmup(self) -> None:
        # Offline shapes follow the input; streaming compiles once, here.
        self.stream(np.zeros(self.chunk_samples, np.float32), lambda _text: None)

    @property
    def chunk_samples(self) -> int:
        return wav2vec2.chunk_samples(self.config, self.stream_config)

    @property
    def chunk_ms(self) -> float:
        """The streaming chunk actually used (after rounding to whole frames)."""
        return self.chunk_samples * 1000 / wav2vec2.SAMPLE_RATE

    def stream(self, audio: np.ndarray, on_partial: Callable[[str], None]) -> str:
        """Feeds `audio` chunk by chunk through the cached-state encoder; calls
        `on_partial(text)` whenever the partial text changes; returns the final text."""
        state = wav2vec2.init_state(self.config, 1, self.stream_config)
        step = self.chunk_samples
        greedy = GreedyState()
        beam = beam_init(1, self.beam_size) if self.beam_size > 1 else None
        last = ""

        def consume(chunk: np.ndarray, valid: int) -> None:
            nonlocal state, greedy, beam, last
            out, state = wav2vec2.encode_chunk(
                self._stream_params, state, jnp.asarray(chunk)[None],
                jnp.asarray([valid], jnp.int32),
            )  # fmt: skip
            logits = np.asarray(out.logits[0])[np.asarray(out.mask[0])]
            if beam is not None:
                beam = beam_step(beam, logits[None], self.vocab)
                text = beam_results(beam, self.vocab, top=1)[0][0].text
            else:
                greedy = greedy_step(greedy, logits, self.vocab)
                text = greedy_result(greedy, self.vocab).text
            if text != last:
                last = text
                on_partial(text)

        for start in range(0, len(audio), step):
            piece = np.zeros(step, np.float32)
            real = np.asarray(audio[start : start + step], np.float32)
            piece[: len(real)] = real
            consume(piece, len(real))
        # Flush: the look-ahead frames still owed are emitted by empty chunks.
        for _ in range(int(wav2vec2.pending_chunks(state)[0])):
            consume(np.zeros(step, np.float32), 0)
        return last
