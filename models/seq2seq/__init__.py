"""Sequence-to-sequence speech recognizers: an encoder, a text decoder with
cross-attention over a fixed-size KV cache, and the shared search of `models.decoding`.

- `text_decoders`: BART, mBART, Speech2Text's and GPT-2 (cross-attention) decoders.
- `speech2text` (+ `s2t_features`, its Kaldi filterbank front end): fairseq S2T.
- `speech_encoder_decoder`: a wav2vec2 / conformer encoder with one of those decoders.

Each model module has the same entry points (`load`, `encode`, `cross_kv`, `decoder`,
`generate`, `transcribe`); import the module, e.g. `from models.seq2seq import speech2text`.
"""
