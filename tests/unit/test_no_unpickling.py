"""Nothing in our packages deserializes with pickle (or anything that runs code on load).

Every byte that crosses a process boundary is protobuf, msgpack/CBOR or JSON: a peer that
can reach a port must not be able to run code in a router or worker by sending a pickle.
The scan is over the source's syntax tree, so a call cannot hide behind an alias import
(``from pickle import loads as l``) or ``getattr(pickle, "loads")``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Folders of the `pdserve` distribution (pyproject package-dir); generated protos excluded.
PACKAGES = ("pdserve", "router", "prefill_worker", "decode_worker", "kv_transfer", "deploy")
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "cloudpickle",
    "dill",
    "marshal",
    "shelve",
    "jsonpickle",
}
UNSAFE_NAMES = {"load", "loads", "Unpickler", "open"}  # per module above
# Methods that unpickle whatever the peer sent, whatever the receiver's module.
UNSAFE_METHODS = {"recv_pyobj", "recv_serialized"}


def problems(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module it stands for
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UNSAFE_MODULES:
                    aliases[a.asname or a.name] = a.name
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES
        ):
            for a in node.names:
                if a.name in UNSAFE_NAMES or a.name == "*":
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute):
            if (
                isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr in UNSAFE_NAMES
            ):
                found.append(f"{where}: {aliases[node.value.id]}.{node.attr}")
            if node.attr in UNSAFE_METHODS:
                found.append(f"{where}: .{node.attr}()")
        elif isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Name)
                and func.id == "getattr"
                and node.args
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id in aliases
            ):
                found.append(f"{where}: getattr({node.args[0].id}, ...)")
            name = func.attr if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "load" and isinstance(func, ast.Attribute):
                owner = func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    safe = keywords.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        found.append(f"{where}: torch.load without weights_only=True")
                if isinstance(owner, ast.Name) and owner.id == "yaml" and "Loader" in keywords:
                    found.append(f"{where}: yaml.load with a Loader (use yaml.safe_load)")
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"{where}: allow_pickle=True")
    return found


def test_no_package_unpickles_anything() -> None:
    found: list[str] = []
    files = 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "pdserve/v1" in path.as_posix():
                continue  # generated protobuf code
            files += 1
            found += problems(path.read_text(), str(path.relative_to(ROOT)))
    assert files > 50  # the scan really covered the packages
    assert found == []


def test_the_scan_catches_the_usual_disguises() -> None:
    bad = {
        "import pickle\npickle.loads(b'')": "pickle.loads",
        "import pickle as p\nx = p.Unpickler": "pickle.Unpickler",
        "from pickle import loads as l": "from pickle import loads",
        "import cloudpickle\ncloudpickle.loads(b'')": "cloudpickle.loads",
        "import pickle\ngetattr(pickle, 'lo' + 'ads')": "getattr(pickle",
        "def f(sock):\n    return sock.recv_pyobj()": ".recv_pyobj()",
        "import torch\ntorch.load('x')": "torch.load without",
        "import numpy as np\nnp.load('x', allow_pickle=True)": "allow_pickle=True",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)": "yaml.load with a Loader",
    }
    for source, expected in bad.items():
        found = problems(source, "x.py")
        assert any(expected in f for f in found), (source, found)
    fine = (
        "import pickle\nh = pickle.dumps(1)",  # serializing our own data (hashing) is fine
        "import torch\ntorch.load('x', weights_only=True)",
        "import yaml\nyaml.safe_load(s)",
        "import json\njson.loads('1')",
    )
    for source in fine:
        assert problems(source, "x.py") == [], source
