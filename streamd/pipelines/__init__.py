"""Recognition pipelines of the daemon, one module per name (`streamd.pipelines.whisper`).

Each module exposes `create(config, engine) -> Pipeline` and registers it with
`streamd.recognizer.register_pipeline` on import.
"""
