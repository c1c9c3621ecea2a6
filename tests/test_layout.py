"""The package's shape, kept by tests: no import cycles, modules a reader can hold in their head,
and the typed manifest keeping what a newer mmsearch wrote."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import mmsearch
from mmsearch.storage.manifest import Manifest

PKG = Path(mmsearch.__file__).parent
MAX_LINES = 420  # "about 400"
# Modules allowed past MAX_LINES, with the reason (the issue that shrinks them).
LONG_MODULES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The mmsearch modules `name` imports anywhere in its body (lazy imports included: a cycle
    broken by importing inside a function is still a cycle in the design)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & mods.keys()
            deps |= subs
            if target in mods and len(subs) < len(node.names):
                deps.add(target)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names} & mods.keys()
    deps.discard(name)
    return deps


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_modules_stay_short():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES
    }
    assert not long, f"over {MAX_LINES} lines (split them, or say why in LONG_MODULES): {long}"


def test_manifest_round_trip_keeps_fields_of_a_newer_version(tmp_path):
    written = {
        "format_version": 1,
        "name": "photos",
        "encoder": {"key": "k", "spec": "ViT-B-32", "dim": 512},
        "data": "gen-1",
        "vector_index": {"choice": "ivf", "nprobe": 8, "from_the_future": 1},
        "calibration_v9": {"x": 1},
    }
    m = Manifest.from_json(written)
    assert (m.name, m.data, m.vector_index.choice, m.vector_index.nprobe) == (
        "photos", "gen-1", "ivf", 8
    )  # fmt: skip
    m.write(tmp_path / "manifest.json")
    again = json.loads((tmp_path / "manifest.json").read_text())
    assert again["calibration_v9"] == {"x": 1}
    assert again["encoder"] == written["encoder"] and again["data"] == "gen-1"
    assert again["created"] == again["updated"]
