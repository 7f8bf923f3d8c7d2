"""The package's import graph: circles, imports inside functions, modules per folder, the largest module, and
imports that run upward through the layers of docs/design.md.

    python scripts/import_graph.py                 # prints the tables
    python scripts/import_graph.py --json g.json   # and writes them as JSON

Reads the source with ``ast`` (nothing is imported). ``losses/`` is read as ``probloss.losses``. An import
counts as "inside a function" when it sits in a def's body; imports under ``if TYPE_CHECKING:`` are not
counted as arrows (they never run).
"""
from __future__ import annotations

import argparse
import ast
import json
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Lower number = lower layer. A module may import its own layer and the ones below, never one above.
# The first matching prefix wins, so list the longer prefixes first.
LAYERS = [
    ("probloss.cli", 7),
    ("probloss.studies", 6),
    ("probloss.training", 5),
    ("probloss.eval", 4),
    ("probloss.data", 3),
    ("probloss.models", 2),
    ("probloss.losses", 1),
    ("probloss", 0),  # probloss/*.py: the loss library (contract, registry, dist, tiled, testing) and errors, files
]


def layer_of(module: str) -> int:
    for prefix, level in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise ValueError(module)


def source_files() -> dict[str, Path]:
    """Module name -> file, for probloss/ and losses/ (as probloss.losses)."""
    files = {}
    for root, package in ((REPO / "probloss", "probloss"), (REPO / "losses", "probloss.losses")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, modules: set[str]) -> list[dict]:
    """Each import statement of a file: the internal module(s) it names, its line, whether it runs in a def."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append({"line": child.lineno, "in_function": in_function, "name": alias.name,
                                  "target": resolve(alias.name) if alias.name.startswith("probloss") else None})
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                internal = name.startswith("probloss")
                targets = set()
                if internal:
                    for alias in child.names:  # `from probloss.data import loader` names a module
                        targets.add(resolve(f"{name}.{alias.name}") or resolve(name))
                for target in sorted(t for t in targets if t) or [None]:
                    found.append({"line": child.lineno, "in_function": in_function, "name": name,
                                  "target": target})
            visit(child, in_function)

    visit(tree, False)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components with more than one module are the import circles."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def connect(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def measure() -> dict:
    files = source_files()
    modules = set(files)
    graph = {m: set() for m in modules}
    module_level = {m: set() for m in modules}  # the arrows that run when a module is imported
    inside, upward = [], []
    for module, path in files.items():
        for item in imports_of(module, path, modules):
            where = f"{path.relative_to(REPO)}:{item['line']}"
            if item["in_function"]:
                inside.append({"where": where, "imports": item["name"], "internal": item["target"] is not None})
            target = item["target"]
            if target is None or target == module or target == "probloss":
                continue
            # A package's __init__ re-exporting its own modules is not an arrow between layers.
            if module != "probloss" and target.startswith(module + "."):
                continue
            graph[module].add(target)
            if not item["in_function"]:
                module_level[module].add(target)
            if layer_of(target) > layer_of(module):
                upward.append({"where": where, "from": module, "to": target})
    folders = Counter(str(p.parent.relative_to(REPO)) for p in files.values() if p.name != "__init__.py")
    lines = {m: len(p.read_text().splitlines()) for m, p in files.items()}
    largest = max(lines, key=lines.get)
    return {
        "modules": len(files),
        "arrows": sum(len(t) for t in graph.values()),
        "circles": strongly_connected(graph),
        "circles_of_module_level_imports": strongly_connected(module_level),
        "imports_inside_functions": len(inside),
        "internal_imports_inside_functions": sum(i["internal"] for i in inside),
        "inside_functions": inside,
        "upward_imports": upward,
        "modules_per_folder": dict(sorted(folders.items())),
        "largest_module": {"module": largest, "lines": lines[largest]},
        "graph": {m: sorted(t) for m, t in sorted(graph.items())},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the measurement here")
    parser.add_argument("--list", action="store_true", help="list every import inside a function")
    args = parser.parse_args()
    result = measure()
    print(f"modules: {result['modules']}   arrows between modules: {result['arrows']}")
    print(f"import circles: {len(result['circles'])}")
    for circle in result["circles"]:
        print(f"  {len(circle)} modules: {', '.join(circle)}")
    print(f"import circles among module-level imports only: {len(result['circles_of_module_level_imports'])}")
    for circle in result["circles_of_module_level_imports"]:
        print(f"  {len(circle)} modules: {', '.join(circle)}")
    print(f"imports inside functions: {result['imports_inside_functions']} "
          f"({result['internal_imports_inside_functions']} of probloss modules)")
    if args.list:
        for item in result["inside_functions"]:
            print(f"  {item['where']}: {item['imports']}")
    print(f"imports that run upward through the layers: {len(result['upward_imports'])}")
    for item in result["upward_imports"]:
        print(f"  {item['where']}: {item['from']} -> {item['to']}")
    print("modules per folder:")
    for folder, count in result["modules_per_folder"].items():
        print(f"  {folder:28s} {count}")
    print(f"largest module: {result['largest_module']['module']} ({result['largest_module']['lines']} lines)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
