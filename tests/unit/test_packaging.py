"""Every Python package folder is listed in pyproject (a missed one silently vanishes
from wheels), and each design-card folder maps to its `pdserve.<name>` subpackage."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_all_packages_are_listed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            if not any(
                dotted.startswith(other + ".") or dotted == other
                for other in package_dir
                if other != name and other.startswith(name + ".")
            ):
                found.add(dotted)
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"
    for folder in ("router", "prefill_worker", "decode_worker", "kv_transfer"):
        assert package_dir[f"pdserve.{folder}"] == folder
