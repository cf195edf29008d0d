"""Third-party pipeline packages (tests/plugins/<project>/) installed into a folder that
a daemon subprocess gets on PYTHONPATH: what an installer leaves there, a module and a
`<name>-<version>.dist-info` with METADATA and entry_points.txt, written from the
project's pyproject.toml. `pip install --target DIR tests/plugins/streamd-slow-echo`
leaves the same (and takes ~10 s of setuptools here: too slow per test).

    env = {"PYTHONPATH": str(install_plugin(tmp_path, "streamd-slow-echo"))}
    with serve(tmp_path, "--pipeline", "slow-echo", env=env) as daemon: ...
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def install_plugin(target: Path, project: str) -> Path:
    """Install tests/plugins/`project` (its `py-modules` and entry points) under
    `target`/site; returns that folder."""
    source = PLUGINS / project
    meta = tomllib.loads((source / "pyproject.toml").read_text())
    name, version = meta["project"]["name"], meta["project"]["version"]
    site = target / "site"
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    for module in meta["tool"]["setuptools"]["py-modules"]:
        shutil.copy(source / f"{module}.py", site / f"{module}.py")
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = meta["project"].get("entry-points", {})
    (dist_info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items())
        for group, entries in groups.items()))
    return site
