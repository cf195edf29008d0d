"""Recognition pipelines, found by name through package entry points.

A pipeline is a factory `create(config, engine) -> Pipeline` (the interface is in
streamd/recognizer.py) that a package registers under the entry-point group
`streamd.pipelines`; its entry-point name is what `recognition.pipeline` (`--pipeline`,
`STREAMD_RECOGNITION_PIPELINE`) selects. streamd's own pipelines (whisper, ctc,
conformer, two-pass, echo) are registered in its pyproject.toml like any third-party one
(docs/pipelines.md), so there is one way to find them all.

This module imports nothing heavy: the config reads the installed names to validate
`recognition.pipeline`, and only the selected pipeline's module is ever imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from streamd.errors import ConfigError, Unsupported

ENTRY_POINT_GROUP = "streamd.pipelines"
CONFIG_KEY = "recognition.pipeline"


@functools.cache
def installed_pipelines() -> dict[str, tuple[EntryPoint, ...]]:
    """Pipeline name -> the entry points that register it (one, unless two packages
    claim the same name). Read once per process: about 50 ms on a large environment,
    and packages installed while the daemon runs are not picked up anyway."""
    found: dict[str, list[EntryPoint]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, []).append(entry)
    return {name: tuple(entries) for name, entries in sorted(found.items())}


def check_pipeline_name(name: str) -> None:
    """ConfigError naming `recognition.pipeline` unless exactly one package registers
    `name`."""
    installed = installed_pipelines()
    if not installed:
        raise ConfigError(CONFIG_KEY, f"unknown pipeline {name!r}: no package registers "
                          f"any ({ENTRY_POINT_GROUP!r} entry points); streamd's own come "
                          "with its package metadata: pip install -e . (or pip install "
                          "streamd)")
    entries = installed.get(name)
    if not entries:
        raise ConfigError(CONFIG_KEY, f"unknown pipeline {name!r}; installed: "
                          f"{', '.join(installed)}")
    if len({entry.value for entry in entries}) > 1:
        owners = ", ".join(f"{_owner(entry)} ({entry.value})" for entry in entries)
        raise ConfigError(CONFIG_KEY, f"pipeline {name!r} is registered by more than one "
                          f"package: {owners}; uninstall one")


def load_pipeline_factory(name: str) -> Callable[..., Any]:
    """The factory `create(config, engine) -> Pipeline` registered as `name`; its module
    is imported now. ConfigError for a name no package registers (or two do),
    Unsupported when the registered object cannot be imported."""
    check_pipeline_name(name)
    entry = installed_pipelines()[name][0]
    try:
        factory = entry.load()
    except (ImportError, AttributeError) as exc:
        raise Unsupported(f"pipeline {name!r} ({entry.value}, from {_owner(entry)}) "
                          f"cannot be loaded: {exc}") from exc
    if not callable(factory):
        raise Unsupported(f"pipeline {name!r} ({entry.value}) is not a factory: "
                          f"{type(factory).__name__}")
    return factory


def _owner(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return dist.name if dist is not None else "an unknown package"
