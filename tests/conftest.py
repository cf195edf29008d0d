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


def _shared_audio_dir() -> Path:
    env = os.environ.get("STREAMD_SHARED_AUDIO")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "audio"


@pytest.fixture(scope="session")
def shared_audio_dir() -> Path:
    path = _shared_audio_dir()
    if not (path / "manifest.jsonl").exists():
        pytest.skip(f"shared recordings not found at {path} (set STREAMD_SHARED_AUDIO)")
    return path


@pytest.fixture(scope="session")
def shared_manifest(shared_audio_dir: Path) -> list[dict]:
    """Entries of ../shared/audio/manifest.jsonl, with `path` added."""
    entries = []
    for line in (shared_audio_dir / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            entry["path"] = shared_audio_dir / entry["audio"]
            entries.append(entry)
    return entries


@pytest.fixture(autouse=True)
def _state_directory(tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's daemons (in process or children) keep their MQTT journal in a fresh
    folder, as systemd's `StateDirectory=` would give them, never in ~/.local/state."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path_factory.mktemp("state")))
