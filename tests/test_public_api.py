"""The package uses only the public API of Prefect, MLflow and the standard library.

A private name (one underscore, not a dunder) of a library can change in any release without
notice: ``prefect._internal``, ``executor._max_workers``, ``mlflow.store.db.utils.
_initialize_tables``, a ``PREFECT__...`` environment variable. The scanner below reads the
package source (``mlp/``, ``pipeline/``, ``flows/``) with :mod:`ast` and resolves what each
name refers to:

- imports (``import a.b as c``, ``from a.b import c``, relative imports of our own modules);
- local variables bound to a library object (``x = ThreadPoolExecutor()``, ``with
  get_client() as client``), so ``x._max_workers`` is traced back to the standard library;
- ``getattr``/``setattr``/``hasattr``/``delattr`` with a literal attribute name;
- methods and attributes a class of ours defines over a private one of its library base class
  (an override of a private hook is a use of it).

An attribute of an object it cannot trace (a parameter, an attribute of an attribute) is flagged
when it is private and our code defines no such name: its owner may be Prefect, MLflow or the
standard library. Dunders (``__file__``, ``__name__``, ``__version__``) and our own private
names (``_helper`` defined in our code) are fine. The tests at the end show, on small inline
sources, that each kind of violation is caught.

Also here: one Typer app, in one CLI module.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OWN = ("mlp", "pipeline", "flows")
# The libraries whose private names the package must not use.
WATCHED = frozenset({"prefect", "mlflow"} | set(sys.stdlib_module_names))
# Underscore names the standard library documents as public API.
DOCUMENTED = frozenset(
    {
        "os._exit",  # https://docs.python.org/3/library/os.html#os._exit
        "sys._getframe",  # https://docs.python.org/3/library/sys.html#sys._getframe
        "_thread",  # https://docs.python.org/3/library/_thread.html
    }
)
# namedtuple's documented methods and fields (collections.namedtuple), on any object.
DOCUMENTED_ATTRIBUTES = frozenset({"_asdict", "_replace", "_make", "_fields", "_field_defaults"})
PRIVATE_ENV = re.compile(r"\bPREFECT__[A-Z0-9_]*")
ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


def is_private(name: str) -> bool:
    """One leading underscore and not a dunder: ``_x`` and ``__x`` yes, ``__x__`` no."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def watched(origin: str) -> bool:
    """Whether a dotted origin (``concurrent.futures.ThreadPoolExecutor()``) is watched."""
    return origin.split(".", 1)[0] in WATCHED and origin.split(".", 1)[0] not in OWN


def private_part(origin: str) -> str | None:
    """The first private component of a dotted origin, None when all are public."""
    parts = [part.removesuffix("()") for part in origin.split(".")]
    for index, part in enumerate(parts):
        if is_private(part) and ".".join(parts[: index + 1]) not in DOCUMENTED:
            return part
    return None


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


# ------------------------------------------------------------------------------ the scanner
def own_private_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every private name our code defines: functions, classes, variables, attributes, fields."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in {"self", "cls"}
            ):
                names.add(node.attr)  # an attribute our class sets on its own instances
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "setattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                names.add(node.args[1].value)
    return {name for name in names if is_private(name)}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class Scanner(ast.NodeVisitor):
    """The violations of one module, given the private names our whole package defines."""

    def __init__(self, module: str, path: str, own_names: set[str], is_package: bool = False):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.path = path
        self.own_names = own_names
        self.scopes: list[dict[str, str]] = [{}]  # local name -> dotted origin
        self.found: list[Violation] = []

    # -- bookkeeping -------------------------------------------------------------------------
    def flag(self, node: ast.AST, what: str) -> None:
        self.found.append(Violation(self.path, getattr(node, "lineno", 0), what))

    def bind(self, name: str, origin: str | None) -> None:
        if origin is None:
            self.scopes[-1].pop(name, None)  # rebound to something untraced
        else:
            self.scopes[-1][name] = origin

    def lookup(self, name: str) -> str | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def origin(self, node: ast.AST) -> str | None:
        """The dotted origin of an expression, when it leads back to an import."""
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            base = self.origin(node.value)
            return None if base is None else f"{base}.{node.attr}"
        if isinstance(node, ast.Call):
            base = self.origin(node.func)
            return None if base is None else f"{base}()"
        return None

    def absolute(self, module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = self.package.split(".")
        base = base[: len(base) - (level - 1)] if level > 1 else base
        return ".".join([*base, *([module] if module else [])])

    # -- imports ----------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            part = private_part(alias.name)
            if watched(alias.name) and part:
                self.flag(node, f"import of private module {alias.name}")
            if alias.asname:
                self.bind(alias.asname, alias.name)
            else:
                root = alias.name.split(".")[0]
                self.bind(root, root)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = self.absolute(node.module, node.level)
        for alias in node.names:
            if alias.name == "*":
                continue
            origin = f"{module}.{alias.name}"
            part = private_part(origin)
            if watched(module) and part:
                self.flag(node, f"import of private name {origin}")
            self.bind(alias.asname or alias.name, origin)

    # -- scopes and bindings ----------------------------------------------------------------
    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self.bind(node.name, None)
        self.scopes.append({})
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            self.bind(arg.arg, None)
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expression in [*node.bases, *node.keywords, *node.decorator_list]:
            self.visit(expression)
        for base in node.bases:
            origin = self.origin(base)
            if origin is None or not watched(origin):
                continue
            base_object = resolve(origin)
            for name in class_body_names(node):
                if is_private(name) and base_object is not None and hasattr(base_object, name):
                    self.flag(node, f"class {node.name} overrides private {origin}.{name}")
        self.scopes.append({})
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()
        self.bind(node.name, None)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        origin = self.origin(node.value)
        for target in node.targets:
            self.visit(target)
            if isinstance(target, ast.Name):
                self.bind(target.id, origin)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)
        if isinstance(node.target, ast.Name):
            self.bind(node.target.id, self.origin(node.value) if node.value else None)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.scopes.append({})
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            self.bind(arg.arg, None)
        self.visit(node.body)
        self.scopes.pop()

    def _unbind_targets(self, target: ast.AST) -> None:
        for name in ast.walk(target):
            if isinstance(name, ast.Name):
                self.bind(name.id, None)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self._unbind_targets(node.target)
        for statement in [*node.body, *node.orelse]:
            self.visit(statement)

    visit_AsyncFor = visit_For

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp):
        self.scopes.append({})
        for generator in node.generators:  # before the element: they bind its names
            self.visit(generator.iter)
            self._unbind_targets(generator.target)
            for condition in generator.ifs:
                self.visit(condition)
        for part in (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,):
            self.visit(part)
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self.bind(node.name, None)
        for statement in node.body:
            self.visit(statement)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.bind(node.target.id, self.origin(node.value))

    def visit_withitem(self, node: ast.withitem) -> None:
        self.visit(node.context_expr)
        if node.optional_vars is not None:
            self.visit(node.optional_vars)
            if isinstance(node.optional_vars, ast.Name):
                self.bind(node.optional_vars.id, self.origin(node.context_expr))

    # -- uses -------------------------------------------------------------------------------
    def _attribute(self, node: ast.AST, base: ast.AST, attr: str) -> None:
        if not is_private(attr):
            return
        origin = self.origin(base)
        if origin is not None:
            full = f"{origin}.{attr}"
            if watched(origin) and full.removesuffix("()") not in DOCUMENTED:
                self.flag(node, f"private attribute {full}")
        elif attr not in self.own_names and attr not in DOCUMENTED_ATTRIBUTES:
            self.flag(node, f"private attribute .{attr} of an object our code does not define")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._attribute(node, node.value, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in ATTRIBUTE_FUNCTIONS
            and self.lookup(node.func.id) is None  # the builtin
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            self._attribute(node, node.args[0], node.args[1].value)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            for match in PRIVATE_ENV.findall(node.value):
                self.flag(node, f"private Prefect setting {match}")


def class_body_names(node: ast.ClassDef) -> Iterator[str]:
    """Names a class body defines: methods, nested classes, class attributes."""
    for statement in node.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield statement.name
        elif isinstance(statement, ast.Assign):
            yield from (t.id for t in statement.targets if isinstance(t, ast.Name))
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            yield statement.target.id


def resolve(origin: str) -> object | None:
    """The object a dotted origin names (imported), None when it cannot be imported."""
    parts = origin.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                found = getattr(found, part)
        except AttributeError:
            return None
        return found
    return None


def scan(sources: dict[str, tuple[str, str]]) -> list[Violation]:
    """Violations in ``{module: (path, source)}`` (module names dotted, packages included)."""
    trees = {module: ast.parse(source, filename=path) for module, (path, source) in sources.items()}
    own_names = own_private_names(trees)
    found: list[Violation] = []
    for module, tree in trees.items():
        path = sources[module][0]
        scanner = Scanner(module, path, own_names, is_package=path.endswith("__init__.py"))
        scanner.visit(tree)
        found += scanner.found
    return found


def package_sources() -> dict[str, tuple[str, str]]:
    sources = {}
    for package in OWN:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = str(path.relative_to(REPO))
            sources[module_name(path, REPO)] = (relative, path.read_text(encoding="utf-8"))
    return sources


def scan_snippet(source: str, module: str = "flows.example", **others: str) -> list[str]:
    """The violations of an inline module (and of ``others``, more modules by name)."""
    sources = {module: (f"{module}.py", textwrap.dedent(source))}
    sources.update({name: (f"{name}.py", textwrap.dedent(text)) for name, text in others.items()})
    return [violation.what for violation in scan(sources)]


# ------------------------------------------------------------------------------ the package
def test_package_sources_are_found():
    # Arrange / Act
    sources = package_sources()

    # Assert: the scan below covers the whole package, not an empty glob.
    assert {"flows.cli", "pipeline.tracking.publish", "mlp.network"} <= set(sources), sorted(
        sources
    )
    assert len(sources) >= 40, f"only {len(sources)} modules found under {OWN}"


def test_the_package_uses_no_private_name_of_prefect_mlflow_or_the_stdlib():
    # Act
    found = scan(package_sources())

    # Assert
    assert not found, "private names of Prefect, MLflow or the standard library:\n" + "\n".join(
        map(str, found)
    )


# ------------------------------------------------------------------------------ the scanner
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(
            "from prefect._internal.concurrency import api\n",
            "import of private name prefect._internal.concurrency.api",
            id="from-private-module",
        ),
        pytest.param(
            "import prefect._internal.concurrency\n",
            "import of private module prefect._internal.concurrency",
            id="import-private-module",
        ),
        pytest.param(
            "from mlflow.store.db.utils import _initialize_tables\n",
            "import of private name mlflow.store.db.utils._initialize_tables",
            id="from-import-private-function",
        ),
        pytest.param(
            """
            import mlflow.store.db.utils

            def make(engine):
                mlflow.store.db.utils._initialize_tables(engine)
            """,
            "private attribute mlflow.store.db.utils._initialize_tables",
            id="attribute-of-imported-module",
        ),
        pytest.param(
            """
            from mlflow.store.db import utils as db

            db._initialize_tables(None)
            """,
            "private attribute mlflow.store.db.utils._initialize_tables",
            id="attribute-through-alias",
        ),
        pytest.param(
            """
            from concurrent.futures import ThreadPoolExecutor

            def workers():
                executor = ThreadPoolExecutor(2)
                return executor._max_workers
            """,
            "private attribute concurrent.futures.ThreadPoolExecutor()._max_workers",
            id="attribute-of-a-stdlib-object",
        ),
        pytest.param(
            """
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor() as pool:
                pool._threads.clear()
            """,
            "private attribute concurrent.futures.ThreadPoolExecutor()._threads",
            id="attribute-of-a-with-target",
        ),
        pytest.param(
            """
            def workers(executor):
                return executor._max_workers
            """,
            "private attribute ._max_workers of an object our code does not define",
            id="attribute-of-an-untraced-object",
        ),
        pytest.param(
            """
            def workers(executor):
                return getattr(executor, "_max_workers", 1)
            """,
            "private attribute ._max_workers of an object our code does not define",
            id="getattr-with-a-literal",
        ),
        pytest.param(
            """
            import threading

            threading._shutdown()
            """,
            "private attribute threading._shutdown",
            id="stdlib-module-attribute",
        ),
        pytest.param(
            """
            import os

            os.environ["PREFECT__FLOW_RUN_ID"] = "1"
            """,
            "private Prefect setting PREFECT__FLOW_RUN_ID",
            id="prefect-double-underscore-env-var",
        ),
        pytest.param(
            """
            from prefect.task_runners import ThreadPoolTaskRunner

            class Runner(ThreadPoolTaskRunner):
                def _register_worker_thread(self):
                    pass
            """,
            "class Runner overrides private "
            "prefect.task_runners.ThreadPoolTaskRunner._register_worker_thread",
            id="override-of-a-private-hook",
        ),
        pytest.param(
            """
            from prefect.context import FlowRunContext

            def client():
                return FlowRunContext.get().client._client
            """,
            "private attribute prefect.context.FlowRunContext.get().client._client",
            id="attribute-of-a-call-result",
        ),
        pytest.param(
            """
            import threading

            def names(threads):
                return [thread.name for thread in threads if threading._shutdown]
            """,
            "private attribute threading._shutdown",
            id="inside-a-comprehension",
        ),
    ],
)
def test_the_scanner_catches(source, expected):
    # Act
    found = scan_snippet(source)

    # Assert
    assert found == [expected], f"expected exactly [{expected!r}], got {found}"


def test_the_scanner_accepts_dunders_own_private_names_and_documented_ones():
    # Arrange: every kind of underscore name that is not a library's private one.
    source = """
        import os
        import sys

        from flows.helpers import _shared
        from . import helpers
        from .helpers import _relative

        import mlflow


        class Cache:
            def __init__(self):
                self._entries = {}

            def _helper(self):
                return self._entries.get(__name__), type(self).__name__


        def _local():
            return __file__, mlflow.__version__, sys._getframe(0), helpers._shared


        def done(row, cache):
            cache._entries.clear()
            if getattr(cache, "_entries", None) is None:
                os._exit(1)
            return row._asdict(), _shared, _relative, _local()
        """
    helpers = "def _shared():\n    pass\n\n\ndef _relative():\n    pass\n"

    # Act
    found = scan_snippet(source, **{"flows.helpers": helpers})

    # Assert
    assert found == [], f"false positives: {found}"


def test_our_own_name_does_not_hide_a_traced_library_attribute():
    # Arrange: our code defines _max_workers too, but this executor is the standard library's.
    source = """
        from concurrent.futures import ThreadPoolExecutor


        class Pool:
            _max_workers = 2


        def workers():
            executor = ThreadPoolExecutor(2)
            return executor._max_workers
        """

    # Act
    found = scan_snippet(source)

    # Assert
    assert found == ["private attribute concurrent.futures.ThreadPoolExecutor()._max_workers"], (
        found
    )


def test_a_rebound_name_is_no_longer_traced():
    # Arrange: `pool` first holds a library object, then one of ours.
    source = """
        from concurrent.futures import ThreadPoolExecutor


        class Pool:
            _size = 1


        def size():
            pool = ThreadPoolExecutor()
            pool = Pool()
            return pool._size
        """

    # Act / Assert
    assert scan_snippet(source) == [], "a name rebound to our own object was still traced"


# ------------------------------------------------------------------------------ one CLI
def _typer_apps() -> tuple[list[tuple[str, str]], set[str]]:
    """(module, variable) of every ``typer.Typer(...)`` of the package, and the sub-apps."""
    apps, sub_apps = [], set()
    for module, (_path, source) in package_sources().items():
        tree = ast.parse(source)
        scanner = Scanner(module, _path, set())
        scanner.visit(tree)  # for its import bindings (module level)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and scanner.origin(node.value.func) == "typer.Typer"
            ):
                apps += [(module, t.id) for t in node.targets if isinstance(t, ast.Name)]
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_typer"
                and node.args
                and isinstance(node.args[0], ast.Name)
            ):
                sub_apps.add(f"{module}.{node.args[0].id}")
    return apps, sub_apps


def test_exactly_one_typer_app_in_one_cli_module():
    # Act
    apps, sub_apps = _typer_apps()
    roots = [f"{module}.{name}" for module, name in apps if f"{module}.{name}" not in sub_apps]

    # Assert
    assert roots == ["flows.cli.app"], f"root Typer apps: {roots} (all apps: {apps})"
    assert {module for module, _ in apps} == {"flows.cli"}, f"Typer apps outside flows.cli: {apps}"


def test_no_other_module_parses_a_command_line():
    # Arrange
    parsers = {"typer", "click", "argparse", "optparse", "getopt"}
    found = []

    # Act
    for module, (_path, source) in package_sources().items():
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found += [(module, n) for n in names if n.split(".")[0] in parsers]

    # Assert
    assert {module for module, _ in found} == {"flows.cli"}, f"command-line parsing: {found}"


def test_the_console_script_is_the_cli_module():
    # Arrange
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    # Act
    scripts = project.get("scripts", {})

    # Assert
    assert scripts == {"mlp-pipeline": "flows.cli:main"}, f"console scripts: {scripts}"
    assert not (REPO / "pipeline" / "cli.py").exists(), "a second CLI module: pipeline/cli.py"
