"""The persistent compilation cache: where it goes and what overrides it, in fresh
processes (JAX reads these settings once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import json, sys
from models.disk_cache import enable_compilation_cache
if sys.argv[1] == "jax-first":
    import jax
got = enable_compilation_cache(sys.argv[2] or None)
import jax
print(json.dumps({"returned": str(got), **{k: jax.config.values[k] for k in (
    "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes")}}))
"""


def _probe(env: dict[str, str], order: str = "cache-first", directory: str = "") -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("STREAMD_", "JAX_COMPILATION", "JAX_PERSISTENT",
                                  "CACHE_DIRECTORY", "XDG_CACHE_HOME"))}
    proc = subprocess.run([sys.executable, "-c", PROBE, order, directory], cwd=REPO,
                          env={**clean, "PYTHONPATH": str(REPO), **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("order", ["cache-first", "jax-first"])
def test_default_folder_and_thresholds(tmp_path: Path, order: str) -> None:
    got = _probe({"STREAMD_CACHE_DIR": str(tmp_path / "c")}, order)
    assert got["returned"] == got["jax_compilation_cache_dir"] == str(tmp_path / "c" / "jax")
    assert (tmp_path / "c" / "jax").is_dir()
    assert got["jax_persistent_cache_min_compile_time_secs"] == 0
    assert got["jax_persistent_cache_min_entry_size_bytes"] == -1


def test_folder_precedence(tmp_path: Path) -> None:
    # systemd's CACHE_DIRECTORY, then XDG_CACHE_HOME (as the params cache resolves it).
    assert _probe({"CACHE_DIRECTORY": f"{tmp_path}/sd:/other"})["returned"] == \
        f"{tmp_path}/sd/jax"
    assert _probe({"XDG_CACHE_HOME": str(tmp_path / "x")})["returned"] == \
        f"{tmp_path}/x/streamd/jax"
    # A configured folder (recognition.compile_cache_dir) beats the default ...
    assert _probe({"STREAMD_CACHE_DIR": str(tmp_path)}, directory=str(tmp_path / "cfg"))[
        "jax_compilation_cache_dir"] == str(tmp_path / "cfg")
    # ... and JAX_COMPILATION_CACHE_DIR (and the user's thresholds) beat everything.
    got = _probe({"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine"),
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"},
                 directory=str(tmp_path / "cfg"))
    assert got["jax_compilation_cache_dir"] == str(tmp_path / "mine")
    assert got["jax_persistent_cache_min_compile_time_secs"] == 2


def test_unwritable_folder_leaves_the_cache_off(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    got = _probe({"STREAMD_CACHE_DIR": str(blocker)})
    assert got["returned"] == "None" and got["jax_compilation_cache_dir"] in (None, "")
