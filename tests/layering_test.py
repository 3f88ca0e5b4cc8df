"""Imports go down the floors of `ARCHITECTURE.md`; the core names no family.

The floors are read from `ARCHITECTURE.md`'s table, so the document and
the rule cannot disagree. Every module of the package sits on one floor;
an import of a module on a higher floor fails here, as does an import
inside a function (a sign of a module on the wrong floor) unless it is in
`FUNCTION_LEVEL`, with its reason, and a loop between packages.
"""

import ast
import pathlib
import re

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "keras_selfdistill"

# `(importer, imported)`: the imports allowed inside a function.
FUNCTION_LEVEL = {
    # `python -m keras_selfdistill --help` answers without importing
    # TensorFlow, which the demo needs.
    ("keras_selfdistill.__main__", "keras_selfdistill.demo"): "start-up",
}

# The floor whose modules may name no class of `terms/` or `teachers/`.
CORE = 4


def floors():
    """`{module or package: floor}` from ARCHITECTURE.md's table."""
    table = {}
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for floor, modules in re.findall(
        r"^\| (\d) \| [^|]+ \| ([^|]+) \|$", text, re.MULTILINE
    ):
        for name in re.findall(r"`([\w./]+)`", modules):
            name = "" if name == "__init__" else "." + name.strip("/")
            table["keras_selfdistill" + name] = int(floor)
    return table


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(name, table):
    """The floor of a module: its own entry's or its subpackage's."""
    while name not in table and name.count(".") > 1:
        name = name.rsplit(".", 1)[0]
    return table.get(name)


def imports(text):
    """`[(imported module, inside a function)]` of the package's imports."""
    tree = ast.parse(text)
    functions = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    nested = {
        id(inner) for function in functions for inner in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from keras_selfdistill import x` imports the module `x` where
            # there is one, else the package's name `x`.
            names = []
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                relative = candidate.replace(".", "/")
                exists = (ROOT / f"{relative}.py").exists() or (
                    ROOT / relative
                ).is_dir()
                names.append(candidate if exists else node.module)
        else:
            continue
        for name in names:
            if name.split(".")[0] == "keras_selfdistill":
                found.append((name, id(node) in nested))
    return found


def sources():
    """`[(module name, its source)]` of every module of the package."""
    return [
        (module_name(path), path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def violations(table, modules):
    found = []
    for importer, text in modules:
        own = floor_of(importer, table)
        if own is None:
            found.append(f"{importer}: on no floor of ARCHITECTURE.md")
            continue
        for imported, local in imports(text):
            theirs = floor_of(imported, table)
            if local and (importer, imported) not in FUNCTION_LEVEL:
                found.append(f"{importer}: imports {imported} in a function")
            if theirs is not None and theirs > own:
                found.append(
                    f"{importer} (floor {own}) imports {imported} "
                    f"(floor {theirs})"
                )
    return found


def package_edges(modules):
    """`{unit: units it imports}` between the package's top-level modules
    and subpackages (the package's own `__init__` is none of them)."""

    def unit(name):
        parts = name.split(".")
        return parts[1] if len(parts) > 1 else None

    edges = {}
    for importer, text in modules:
        source = unit(importer)
        if source is None:
            continue
        for imported, _ in imports(text):
            target = unit(imported)
            if target is not None and target != source:
                edges.setdefault(source, set()).add(target)
    return edges


def loops(edges):
    """Every cycle of the graph `edges`, as a path back to its start."""
    found = []

    def visit(node, trail):
        for target in sorted(edges.get(node, ())):
            if target == trail[0]:
                found.append(trail + [target])
            elif target not in trail:
                visit(target, trail + [target])

    for start in sorted(edges):
        visit(start, [start])
    return found


def family_classes():
    names = set()
    for folder in ("terms", "teachers"):
        for path in (PACKAGE / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            names.update(
                node.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ClassDef)
            )
    return names


def named_families(text, families):
    tree = ast.parse(text)
    named = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    named |= {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
    }
    named |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    return sorted(named & families)


class LayeringTest(absltest.TestCase):
    def test_every_module_imports_only_its_floor_and_below(self):
        self.assertEqual(violations(floors(), sources()), [])

    def test_no_loop_between_packages(self):
        self.assertEqual(loops(package_edges(sources())), [])

    def test_the_core_names_no_term_or_teacher_class(self):
        families = family_classes()
        self.assertIn("Cached", families)
        self.assertIn("Term", families)
        table = floors()
        core = [(n, t) for n, t in sources() if floor_of(n, table) == CORE]
        self.assertIn("keras_selfdistill.distiller", dict(core))
        found = {
            name: named_families(text, families)
            for name, text in core
            if named_families(text, families)
        }
        self.assertEqual(found, {})

    def test_the_walk_catches_each_violation(self):
        bad = (
            "from keras_selfdistill import distiller\n"
            "def f():\n"
            "    from keras_selfdistill import batch\n"
            "teacher = Cached\n"
        )
        found = violations(floors(), [("keras_selfdistill.ops", bad)])
        self.assertLen(found, 2)
        self.assertIn("floor 0) imports keras_selfdistill.distiller", found[0])
        self.assertIn("imports keras_selfdistill.batch in a function", found[1])
        unplaced = violations(floors(), [("keras_selfdistill.new", "")])
        self.assertEqual(
            unplaced, ["keras_selfdistill.new: on no floor of ARCHITECTURE.md"]
        )
        self.assertEqual(named_families(bad, family_classes()), ["Cached"])
        self.assertEqual(
            loops({"a": {"b"}, "b": {"a", "c"}}),
            [["a", "b", "a"], ["b", "a", "b"]],
        )
        self.assertEqual(loops({"a": {"b"}, "b": {"c"}}), [])
