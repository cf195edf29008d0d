"""Where streamd keeps what it computes once: converted params and compiled executables.

Imports no JAX, so entry points can call `enable_compilation_cache()` before the first
compile, ideally before JAX is imported (then JAX reads the settings at import).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# JAX's persistent cache settings (flag name = lower-cased environment name). By default
# JAX stores only executables that took over 1 s to compile; streamd's many small jitted
# steps (decoder step, mel, CTC heads) each cost a fraction of a second, so all are kept.
CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
THRESHOLDS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0.0,
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": -1,  # -1: no size limit
}


def cache_dir() -> Path:
    """streamd's cache folder: $STREAMD_CACHE_DIR, systemd's $CACHE_DIRECTORY (its first
    entry), or $XDG_CACHE_HOME/streamd (~/.cache/streamd)."""
    for env in ("STREAMD_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(env):
            return Path(os.environ[env].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamd"


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache; returns its folder (None: off).

    The folder: $JAX_COMPILATION_CACHE_DIR when set (left as it is), else `directory`
    (e.g. `recognition.compile_cache_dir`), else `cache_dir() / "jax"`. The thresholds
    in THRESHOLDS apply unless their environment variables are set. Settings go into the
    environment (read by a JAX imported later and by child processes) and, when JAX is
    imported already, into `jax.config`; either way this must run before the first
    compile, because JAX opens the cache then. A folder that cannot be created leaves the
    cache off (every start compiles), with a warning.
    """
    settings: dict[str, object] = {}
    folder = os.environ.get(CACHE_DIR_ENV)
    if not folder:
        folder = str(Path(directory) if directory else cache_dir() / "jax")
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("compilation cache off: cannot create %s: %s", folder, exc.strerror)
            return None
        settings[CACHE_DIR_ENV] = folder
    for name, threshold in THRESHOLDS.items():
        if name not in os.environ:
            settings[name] = threshold
    for name, value in settings.items():
        os.environ[name] = str(value)
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name.lower(), value)
    return Path(folder)
