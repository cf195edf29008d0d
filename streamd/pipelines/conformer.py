"""The `conformer` pipeline: the `ctc` pipeline's streaming code with a
wav2vec2-conformer CTC folder (`recognition.model`); the family is checked at load."""

from __future__ import annotations

from streamd.config import Config
from streamd.engine import Engine
from streamd.pipelines.ctc import CTCPipeline, create_family


def create(config: Config, engine: Engine) -> CTCPipeline:
    """Factory for `streamd serve --pipeline conformer --model FOLDER`."""
    return create_family(config, engine, "conformer", "wav2vec2-conformer")
