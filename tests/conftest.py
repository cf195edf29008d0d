"""Shared test fixtures: paths to the shared recordings, JAX settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Persistent compilation cache: repeated test runs skip XLA compiles.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


AUDIO_DIR = REPO_ROOT / "tests" / "data" / "audio"


def _audio_dir(env_name: str, default: Path) -> Path:
    """The recordings travel with the repository; an environment variable may point
    elsewhere. Missing data fails the tests that need it: a skip would turn a fresh clone's
    run green while proving nothing."""
    path = Path(os.environ.get(env_name) or default)
    if not (path / "manifest.jsonl").exists():
        pytest.fail(f"recordings not found at {path} (they ship in tests/data/audio; "
                    f"{env_name} overrides the folder)", pytrace=False)
    return path


def _manifest(folder: Path) -> list[dict]:
    entries = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            entry["path"] = folder / entry["audio"]
            entries.append(entry)
    return entries


@pytest.fixture(scope="session")
def shared_audio_dir() -> Path:
    """The 12 shared recordings (11 utterances and a 71.6 s stream file)."""
    return _audio_dir("STREAMD_SHARED_AUDIO", AUDIO_DIR)


@pytest.fixture(scope="session")
def shared_manifest(shared_audio_dir: Path) -> list[dict]:
    """Entries of tests/data/audio/manifest.jsonl, with `path` added."""
    return _manifest(shared_audio_dir)


@pytest.fixture(scope="session")
def dev_audio_dir() -> Path:
    """The development set: 118 utterances of 1-53 s and a 174.8 s stream file (FLAC)."""
    return _audio_dir("STREAMD_DEV_AUDIO", AUDIO_DIR / "dev")


@pytest.fixture(scope="session")
def dev_manifest(dev_audio_dir: Path) -> list[dict]:
    """Entries of tests/data/audio/dev/manifest.jsonl, with `path` added."""
    return _manifest(dev_audio_dir)


@pytest.fixture(autouse=True)
def _state_directory(tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's daemons (in process or children) keep their MQTT journal in a fresh
    folder, as systemd's `StateDirectory=` would give them, never in ~/.local/state."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path_factory.mktemp("state")))
