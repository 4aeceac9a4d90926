"""Which generic modules import ShapesWorld? None should: a world joins through the registries
(``diffalign.registry``), and generic code finds it by name.

Generic means every module of ``diffalign/`` outside ``diffalign/shapes/``, and ``rewards/`` and
``defenses/`` (installed as ``diffalign.rewards`` and ``diffalign.defenses``). Two checks:

* **static** — every ``import`` statement of those files, function-local ones included, is read
  with ``ast``; one naming ``diffalign.shapes`` (or ``from diffalign import shapes``) is listed.
* **loaded** — a fresh interpreter imports every generic module and reports whether any
  ``diffalign.shapes`` module ended up in ``sys.modules``.

    python -m diffalign.benchmarks.import_graph                # -> ./results/import_graph/
    python -m diffalign.benchmarks.import_graph --output /tmp/graph

Prints each generic module with the diffalign modules it imports, writes
``<output>/import_graph.json``, and exits with status 1 if either check finds an import.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

WORLD = "diffalign.shapes"


def _folder(package: str) -> Path:
    """Where ``package``'s source lies (found without importing it; editable or not)."""
    return Path(importlib.util.find_spec(package).submodule_search_locations[0])


GENERIC = {name: _folder(name) for name in ("diffalign", "diffalign.rewards", "diffalign.defenses")}
OTHERS = {name: _folder(name) for name in ("diffalign.benchmarks", "diffalign.app")}


def modules_in(packages: dict[str, Path]) -> dict[str, Path]:
    """``{module name: source file}`` of every module under the folders of ``packages``."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            modules[".".join([package, *(part for part in relative.parts if part != "__init__")])] = path
    return modules


def generic_modules() -> dict[str, Path]:
    """``{module name: source file}`` of every generic module (``__main__`` modules left out: they run)."""
    return {
        name: path
        for name, path in modules_in(GENERIC).items()
        if not (name == WORLD or name.startswith(WORLD + ".") or path.stem == "__main__")
    }


def imported_names(path: Path, module: str, known: set[str]) -> set[str]:
    """Every module an ``import`` statement of ``path`` names (relative imports resolved; ``from m
    import x`` names ``m.x`` too when ``x`` is one of the ``known`` modules)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return names


def static_graph() -> dict[str, list[str]]:
    """``{generic module: the diffalign modules it imports}``."""
    known = set(modules_in({**GENERIC, **OTHERS}))
    return {
        module: sorted(name for name in imported_names(path, module, known) if name.startswith("diffalign"))
        for module, path in generic_modules().items()
    }


def world_imports(graph: dict[str, list[str]]) -> dict[str, list[str]]:
    """The edges of ``graph`` that reach the world."""
    found = {m: [n for n in names if n == WORLD or n.startswith(WORLD + ".")] for m, names in graph.items()}
    return {module: names for module, names in found.items() if names}


def loaded_world_modules(modules: list[str]) -> list[str]:
    """The ``diffalign.shapes`` modules in ``sys.modules`` after a fresh interpreter imports ``modules``."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m == {WORLD!r} or m.startswith({WORLD + '.'!r}))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="results/import_graph", help="folder for import_graph.json")
    parser.add_argument("--quiet", action="store_true", help="print only the verdict")
    args = parser.parse_args(argv)
    graph = static_graph()
    static = world_imports(graph)
    loaded = loaded_world_modules(list(graph))
    if not args.quiet:
        for module, names in graph.items():
            print(f"{module:<34} -> {', '.join(names) or '-'}")
    print(
        f"{len(graph)} generic modules; import statements naming {WORLD}: {static or 'none'}; "
        f"{WORLD} modules loaded by importing them all: {loaded or 'none'}"
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    record = {"generic_modules": graph, "static_world_imports": static, "loaded_world_modules": loaded}
    (output / "import_graph.json").write_text(json.dumps(record, indent=1) + "\n", "utf-8")
    return 1 if static or loaded else 0


if __name__ == "__main__":
    raise SystemExit(main())
