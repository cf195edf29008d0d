"""Pipelines found through the `streamd.pipelines` entry points of installed packages
(streamd/pipelines/__init__.py): streamd's own, a third-party package's, and the errors
for unknown, doubly registered and unloadable names. Installed packages here are
dist-info folders on sys.path, as pip leaves them; serving a third-party pipeline from a
real `streamd serve` is test_systemd.py's SIGTERM test (`slow-echo`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.plugins import install_plugin

from streamd import pipelines
from streamd.config import load_config
from streamd.engine import Engine
from streamd.errors import ConfigError, Unsupported
from streamd.recognizer import SegmentInfo, create_pipeline

OWN = ("conformer", "ctc", "echo", "two-pass", "whisper")


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Entry points read again after the test changes sys.path, and again after it."""
    pipelines.installed_pipelines.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    pipelines.installed_pipelines.cache_clear()


def fake_dist(site: Path, name: str, entry_points: str) -> None:
    dist_info = site / f"{name}-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[streamd.pipelines]\n{entry_points}\n")


def config(pipeline: str):
    return load_config(None, {}, {"recognition": {"pipeline": pipeline}})


def test_own_pipelines_are_entry_points() -> None:
    assert set(OWN) <= set(pipelines.installed_pipelines())
    for name in OWN:
        (entry,) = pipelines.installed_pipelines()[name]
        assert entry.value.startswith("streamd.pipelines.")


def test_unknown_name_names_the_key_and_the_installed() -> None:
    with pytest.raises(ConfigError, match="recognition.pipeline") as error:
        config("slow-echo")
    assert "unknown pipeline 'slow-echo'; installed: " + ", ".join(OWN) in str(error.value)


def test_echo_through_the_registry() -> None:
    engine = Engine((1, 2))
    pipeline = create_pipeline("echo", config("echo"), engine)
    assert pipeline.name == "echo" and engine.kinds == ("duration",)
    engine.start()
    try:
        recognizer = pipeline.new_recognizer("s")
        audio = np.zeros(36000, np.float32)  # 2.25 s
        final = asyncio.run(recognizer.final(audio, SegmentInfo("s", 0, 0.0, 2.25)))
    finally:
        asyncio.run(engine.stop())
    assert final.text == "2.25" and pipeline.batch_sizes_seen == [1]


def test_third_party_package_registers_a_name(tmp_path: Path, fresh_registry) -> None:
    fresh_registry.syspath_prepend(str(install_plugin(tmp_path, "streamd-slow-echo")))
    assert config("slow-echo").recognition.pipeline == "slow-echo"
    (entry,) = pipelines.installed_pipelines()["slow-echo"]
    assert entry.dist.name == "streamd-slow-echo"
    factory = pipelines.load_pipeline_factory("slow-echo")
    assert factory(config("slow-echo"), Engine((1,))).name == "slow-echo"


def test_name_claimed_twice_is_refused(tmp_path: Path, fresh_registry) -> None:
    fake_dist(tmp_path, "other_echo", "echo = other_echo:create")
    fresh_registry.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="recognition.pipeline") as error:
        config("echo")
    message = str(error.value)
    assert "'echo' is registered by more than one package" in message
    assert "other_echo (other_echo:create)" in message and "streamd.pipelines.echo" in message
    assert config("whisper").recognition.pipeline == "whisper"  # other names still work


def test_unloadable_pipeline_fails_at_start(tmp_path: Path, fresh_registry) -> None:
    fake_dist(tmp_path, "broken", "broken = no_such_module:create")
    fresh_registry.syspath_prepend(str(tmp_path))
    cfg = config("broken")  # registered: the config is valid
    with pytest.raises(Unsupported, match=r"pipeline 'broken' \(no_such_module:create, "
                                          r"from broken\) cannot be loaded"):
        create_pipeline("broken", cfg, Engine((1,)))
