"""Run mypy on the `pdserve` distribution as it is installed.

pyproject maps top-level folders (router/, kv_transfer/, ...) to subpackages of
`pdserve` with setuptools' package-dir, which mypy cannot follow. This script mirrors
that mapping as a tree of symlinks under build/typecheck/ and type-checks `-p pdserve`
there, so imports like `pdserve.router.service` resolve exactly as they do at run time.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_tree(out: Path) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    root_pkg = out / "pdserve"
    root_pkg.mkdir(parents=True)
    for entry in (ROOT / package_dir["pdserve"]).iterdir():
        (root_pkg / entry.name).symlink_to(entry)
    for name, folder in package_dir.items():
        if name != "pdserve":
            (out / name.replace(".", "/")).symlink_to(ROOT / folder)


def main() -> int:
    out = ROOT / "build" / "typecheck"
    build_tree(out)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    return subprocess.run([*cmd, "-p", "pdserve", *sys.argv[1:]], cwd=out).returncode


if __name__ == "__main__":
    sys.exit(main())
