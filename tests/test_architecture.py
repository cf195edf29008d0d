"""The shape of the code: import directions, no import cycles, and a size limit per file.

The imports of every module in models/, streamd/ and clients/ are read with `ast` (every
import statement, including those inside functions), so nothing is imported here.
`LAYERS` is the rule table; docs/architecture.md shows the same table (checked below).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "streamd", "clients")

# Who may import whom. A module belongs to the longest key that is its name or a package
# above it (its unit); it may import modules of its own unit and modules whose name is, or
# is under, an entry of its unit's row. Imports of the standard library and third-party
# packages are not checked.
LAYERS: dict[str, tuple[str, ...]] = {
    "clients": (),  # the wire contract and MQTT only, nothing of the daemon
    # the rest of models/: decoding, kv_cache, registry, checkpoints (registry loads Whisper)
    "models": ("models.whisper",),
    "models.layers": (),
    "models.whisper": ("models.decoding", "models.kv_cache", "models.checkpoint",
                       "models.registry"),
    "models.wav2vec2": ("models.layers", "models.checkpoint"),
    "models.ctc": ("models.checkpoint", "models.wav2vec2"),
    "models.seq2seq": ("models.layers", "models.checkpoint", "models.decoding",
                       "models.kv_cache", "models.wav2vec2"),
    # the daemon core; `streamd.transcribe` is imported by name (cli), unseen by ast
    "streamd": ("streamd.pipelines", "streamd.transcribe", "streamd.openai_api",
                "models.disk_cache"),
    "streamd.pipelines": ("streamd", "models"),
    "streamd.transcribe": ("streamd", "models"),
    "streamd.openai_api": ("streamd", "models.whisper.transcriber", "models.whisper.decoding"),
}

LINE_LIMIT = 550  # lines per file in models/ and streamd/
# Files over the limit today. The set may only shrink: a listed file that gets under the
# limit must leave the list, and no other file may go over.
OVER_LIMIT_TODAY = {
    "streamd/server.py",
}


def _module_files() -> dict[str, Path]:
    """Module name -> file, for every module of PACKAGES."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` or the nearest package above it that is one of ours (None: not ours)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `module` imports (`from a import b` counts as a.b when b is a
    module, else as a)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else _known(base, modules))
    found.discard(None)
    found.discard(module)
    return {name for name in found if name is not None}


def _graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def unit_of(module: str) -> str | None:
    """The LAYERS key a module belongs to (the longest one above it)."""
    keys = [key for key in LAYERS if _under(module, key)]
    return max(keys, key=len) if keys else None


def allowed(importer: str, imported: str) -> bool:
    unit = unit_of(importer)
    if unit is None:
        return False
    if unit_of(imported) == unit:
        return True
    return any(_under(imported, entry) for entry in LAYERS[unit])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it (None: the graph has none)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


# ----------------------------------------------------------------------------- tests


def test_every_module_has_a_unit():
    assert [m for m in _module_files() if unit_of(m) is None] == []


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_follow_the_layers():
    graph = _graph()
    wrong = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                   if not allowed(a, b))
    assert wrong == [], "imports against LAYERS (docs/architecture.md):\n" + "\n".join(wrong)


def test_models_never_import_the_daemon_or_clients():
    # Implied by LAYERS; stated on its own because it is the rule that matters most.
    graph = _graph()
    assert [f"{a} -> {b}" for a, targets in graph.items() if _under(a, "models")
            for b in targets if not _under(b, "models")] == []


def test_the_checker_sees_violations():
    # The checker itself: each of these edges would be reported.
    assert not allowed("models.whisper", "streamd.config")
    assert not allowed("clients.stream", "streamd.protocol")
    assert not allowed("streamd.session", "models.whisper")
    assert not allowed("models.wav2vec2.transformer", "models.seq2seq.text_decoders")
    assert allowed("streamd.pipelines.ctc", "models.wav2vec2")
    assert allowed("models.wav2vec2.conformer", "models.wav2vec2.state")
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def doc_table() -> list[str]:
    """LAYERS as the markdown rows docs/architecture.md must contain."""
    rows = []
    for unit, entries in LAYERS.items():
        may = ", ".join(f"`{e}`" for e in entries) or "nothing else"
        rows.append(f"| `{unit}` | {may} |")
    return rows


def test_doc_mirrors_the_table():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [row for row in doc_table() if row not in doc.splitlines()]
    assert missing == [], ("docs/architecture.md lacks these rows of LAYERS "
                           "(tests/test_architecture.py):\n" + "\n".join(missing))


def _line_counts() -> dict[str, int]:
    counts = {}
    for package in ("models", "streamd"):
        for path in sorted((REPO / package).rglob("*.py")):
            counts[path.relative_to(REPO).as_posix()] = len(
                path.read_text(encoding="utf-8").splitlines())
    return counts


def test_no_new_file_over_the_line_limit():
    over = sorted(f for f, n in _line_counts().items() if n > LINE_LIMIT)
    new = [f for f in over if f not in OVER_LIMIT_TODAY]
    assert new == [], f"over {LINE_LIMIT} lines (split them along their seams): {new}"


@pytest.mark.parametrize("path", sorted(OVER_LIMIT_TODAY))
def test_over_limit_list_only_shrinks(path):
    counts = _line_counts()
    assert path in counts, f"{path} is gone: remove it from OVER_LIMIT_TODAY"
    assert counts[path] > LINE_LIMIT, (
        f"{path} has {counts[path]} lines, under the limit: remove it from OVER_LIMIT_TODAY")


def test_whisper_decoding_rules_exist_once() -> None:
    """openai/whisper's checks (compression ratio, average log-probability, no-speech
    probability) and Whisper's suppress lists are written in models/whisper/decoding.py
    only: `streamd transcribe` and the daemon's whisper pipeline both import them."""
    home = REPO / "models" / "whisper" / "decoding.py"
    search = REPO / "models" / "decoding.py"  # the generic filters are defined there
    thresholds = re.compile(r"^\s*\w*(COMPRESSION|LOGPROB|NO_SPEECH)\w*THRESHOLD\w*\s*=", re.M)
    checks = re.compile(r"(compression_ratio|avg_logprob|no_speech_prob)\s*[<>]")
    for path in sorted(_module_files().values()):
        if path in (home, search):
            continue
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO)
        assert not thresholds.search(text), f"{where} defines a decoding threshold"
        assert not checks.search(text), f"{where} compares a decode with a threshold"
        assert "SuppressTokens(" not in text and "SuppressAtBegin(" not in text, (
            f"{where} builds a suppress list")
