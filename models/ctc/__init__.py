"""CTC decoding on the host: vocabulary, greedy, prefix beam search, word timestamps.

CTC encoders (wav2vec2, conformer) emit logits `[B, T, V]`, one frame per
`config.frame_s` seconds (20 ms for the base models, the default `frame_stride` here;
other conv layouts and adapters differ, so callers with word times pass their model's).
These modules turn them into text with numpy; nothing here runs on the device.

- `vocab`: `CTCVocab`, a Hugging Face `Wav2Vec2CTCTokenizer` folder read without
  transformers.
- `spans`: `Hypothesis`, `TokenSpans` and `word_timestamps`.
- `greedy`: `greedy_decode` for a whole utterance; `greedy_step` / `greedy_result` for a
  stream fed chunk by chunk.
- `beam`: `prefix_beam_search`; `beam_init` / `beam_step` / `beam_results` for streams.
- `alignment`: `align` / `align_batch` (Viterbi), for beam-search word times.
- `transcriber`: `CTCTranscriber`, whole recordings with a wav2vec2 model (it imports
  JAX and the model; import it as `models.ctc.transcriber`).

Callers import the decoding names below from `models.ctc`.
"""

from models.ctc.alignment import align, align_batch
from models.ctc.beam import (
    BeamState,
    beam_init,
    beam_reset,
    beam_results,
    beam_step,
    prefix_beam_search,
    prefix_beam_search_batch,
)
from models.ctc.greedy import (
    GreedyState,
    greedy_decode,
    greedy_decode_batch,
    greedy_result,
    greedy_step,
    greedy_step_batch,
)
from models.ctc.spans import FRAME_STRIDE_S, Hypothesis, TokenSpans, word_timestamps
from models.ctc.vocab import CTCVocab

__all__ = [
    "FRAME_STRIDE_S", "BeamState", "CTCVocab", "GreedyState", "Hypothesis", "TokenSpans",
    "align", "align_batch", "beam_init", "beam_reset", "beam_results", "beam_step",
    "greedy_decode", "greedy_decode_batch", "greedy_result", "greedy_step",
    "greedy_step_batch", "prefix_beam_search", "prefix_beam_search_batch", "word_timestamps",
]
