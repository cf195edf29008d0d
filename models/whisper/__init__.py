"""Whisper: the model (`model`: config, encoder, incremental decoder with a fixed-size KV
cache), its parameters (`params`), log-mel features (`mel`), the tokenizer, the
CTranslate2 file reader (`ct2`), decoding with openai/whisper's rules (`decoding`), word
timings from cross-attention (`timing`) and the offline long-form `transcriber`."""
