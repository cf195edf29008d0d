"""The `streamd` command: `transcribe` files, `serve` the daemon, list `devices`."""

from __future__ import annotations

import argparse
import sys


def _add_transcribe(subparsers) -> None:
    p = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files (WAV/FLAC, any rate and channel count)",
        description="Transcribe audio files offline and print the text per file.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--model", default=None,
                   help="model name (tiny.en, the embedded default) or a model folder "
                        "(Hugging Face or CTranslate2 Whisper)")
    p.add_argument("--beam-size", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line per file: file, text, duration_s, elapsed_s")
    p.add_argument("--stream", action="store_true",
                   help="CTC models: run the chunked streaming path and print partials")
    p.add_argument("--chunk-ms", type=float, default=320,
                   help="streaming chunk in ms (--stream; default 320), rounded to the nearest "
                        "whole number of the model's output frames (20 ms for wav2vec2-base; "
                        "the product of its conv strides, times the adapter's), at least one")
    p.add_argument("--left-ms", type=float, default=5120,
                   help="streaming attention left context in ms (--stream; default 5120), "
                        "rounded to whole encoder frames")
    p.add_argument("--right-ms", type=float, default=320,
                   help="streaming look-ahead in ms (--stream; default 320), rounded to whole "
                        "encoder frames; with left and right context as long as the file the "
                        "streamed text equals the offline text (layer-norm layouts)")
    p.add_argument("--encoder-window", choices=("bucketed", "padded"), default=None,
                   help="Whisper: encode audio in length buckets or always pad to 30 s")
    p.add_argument("--prompt", default="", metavar="TEXT",
                   help="Whisper: text before every window's decode (initial prompt: names, "
                        "jargon, spelling); at most 500 characters")
    p.add_argument("--context", action=argparse.BooleanOptionalAction, default=False,
                   help="Whisper: decode each 30 s window of a long file after the text of "
                        "the windows before it (default: off)")
    p.add_argument("--word-timestamps", action="store_true",
                   help="Whisper: print each word with its start and end (seconds) and "
                        "confidence, from the alignment heads' cross-attention; with --json, "
                        "a `segments` list with `words`")
    p.set_defaults(run=lambda args: __import__("streamd.transcribe").transcribe.main(args))


def _add_serve(subparsers) -> None:
    from streamd.serve_args import add_arguments

    p = subparsers.add_parser("serve", help="run the streaming recognition daemon")
    add_arguments(p)
    p.set_defaults(run=lambda args: __import__("streamd.daemon").daemon.main(args))


def _add_devices(subparsers) -> None:
    p = subparsers.add_parser("devices", help="list audio input devices")
    p.set_defaults(run=_run_devices)


def _run_devices(args: argparse.Namespace) -> int:
    """Exit 1 with a one-line message when PortAudio is missing or finds no input."""
    from streamd.mic import MicError, list_input_devices

    try:
        devices = list_input_devices()
    except MicError as exc:
        print(f"streamd devices: {exc}", file=sys.stderr)
        return 1
    if not devices:
        print("streamd devices: no audio input devices found", file=sys.stderr)
        return 1
    for dev in devices:
        print(f"{dev['index']:3d}  {dev['name']}  "
              f"({dev['channels']} ch, {dev['default_samplerate']:.0f} Hz)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamd", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_transcribe(subparsers)
    _add_serve(subparsers)
    _add_devices(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "transcribe":
        # Before anything imports JAX. `serve` does this once its config is read
        # (recognition.compile_cache_dir may name the folder).
        from models.disk_cache import enable_compilation_cache

        enable_compilation_cache()
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
