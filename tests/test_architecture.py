"""The import rules of docs/architecture.md, read from the source (every import statement,
function-level ones included), and the map itself checked against the package's files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "platform" / "compresszoo"
HEAVY = {"ray", "mlflow", "boto3"}

# What each part may import from the package (besides itself). The order is the layering:
# nothing imports upwards, so the parts form no cycle.
ALLOWED = {
    "ans": set(),
    "limits": set(),
    "storage": {"limits"},
    "tracking": set(),
    "models": {"ans", "limits", "storage"},
    "codec": {"ans", "models", "limits", "storage"},
    "data": {"limits", "storage"},
    "compat": {"models", "ans", "zoo"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from . import rans`
    return names


def package_parts(names: set[str]) -> set[str]:
    parts = set()
    for n in names:
        bits = n.split(".")
        if bits[0] == "compresszoo" and len(bits) > 1 and ((PKG / bits[1]).is_dir() or (PKG / f"{bits[1]}.py").exists()):
            parts.add(bits[1])
    return parts


SOURCES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)
GRAPH: dict[str, set[str]] = {}
for _src in SOURCES:
    GRAPH.setdefault(part_of(_src), set()).update(package_parts(imports_of(_src)) - {part_of(_src)})


def test_the_scanner_sees_relative_and_function_level_imports():
    # entropy.py imports the coder inside a method: the rule must see it.
    assert "ans" in package_parts(imports_of(PKG / "models" / "entropy.py"))
    assert "models" in package_parts(imports_of(PKG / "codec" / "image.py"))


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_lower_layers_import_only_what_the_map_allows(part):
    extra = GRAPH.get(part, set()) - ALLOWED[part]
    assert not extra, f"compresszoo.{part} imports {sorted(extra)}; docs/architecture.md allows {sorted(ALLOWED[part])}"


@pytest.mark.parametrize("part", ["ans", "models", "codec", "data", "limits", "storage"])
def test_lower_layers_import_no_ray_mlflow_or_boto3(part):
    banned = HEAVY - {"ray"} if part == "data" else HEAVY  # data/reader.py is a Ray Data stream
    for src in SOURCES:
        if part_of(src) == part:
            heavy = {n.split(".")[0] for n in imports_of(src)} & banned
            assert not heavy, f"{src.relative_to(ROOT)} imports {sorted(heavy)}"


def test_the_parts_form_no_cycle():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(GRAPH):
        visit(node, [])


def test_the_map_names_every_part_and_only_existing_files():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for part in GRAPH:
        if part != "__init__":
            assert re.search(rf"\b{re.escape(part)}(/|\.py)", doc), f"docs/architecture.md does not place {part}"
    for ref in set(re.findall(r"(?:platform/compresszoo|pipelines|benchmarks|cluster|tests|docs)/[\w./-]+\.\w+", doc)):
        assert (ROOT / ref).exists(), f"docs/architecture.md names {ref}, which does not exist"


def test_readme_and_docs_link_only_inside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)", text):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
