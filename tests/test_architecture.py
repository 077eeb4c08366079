"""The architecture is checked, not hoped for.

Every module of `mdm_jax` is read with `ast` (nothing is imported, so these tests need neither
jax nor the package's dependencies) and its imports, wherever they are (module level, inside
functions, under `if`/`try`, relative or absolute), become the package's import graph. The tests
fail on import cycles, on private names used across modules, on the forbidden arrows written
once below, on a README "Layout" section that does not list today's modules, and on
`python -m mdm_jax...` commands without a console script. There is no allow-list: a violation is
fixed in the library (or the rule is changed here, with its reason), never excused.
"""

from __future__ import annotations

import ast
import configparser
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "mdm_jax"

# The jax stack: a module that imports any of these (their top-level package) imports jax.
JAX = ("jax", "jaxlib", "flax", "optax", "orbax")

# The forbidden arrows: (from-patterns, to-patterns, reason). A pattern matches a module and its
# submodules ("mdm_jax.inference" matches mdm_jax.inference.mdm, not mdm_jax.inference_x); a
# to-pattern that is not under mdm_jax names a third-party top-level package.
#
# Every rule is TRANSITIVE: a module on the left may not import, directly or through any chain of
# mdm_jax modules, a module on the right. A direct-only rule would be satisfied by moving the
# import one module sideways, which changes nothing: "the model is usable without a trainer" is
# false if the model imports a helper that imports the trainer. The chain counts every import,
# including those inside functions (they run when the function does: resolving a config, loading
# a model), and the package `__init__`s that Python runs before a submodule (importing
# mdm_jax.config runs mdm_jax/__init__.py first). They are not absurd: a chain is reported once,
# at the import where it leaves the rule's left side, and on the tree this was written on (commit
# 5cd2bfe) the loop rule failed at exactly the two direct imports (aot, export.load) that put 16
# other inference/eval/scaling modules transitively on the loop; only config -> jax needed
# transitivity.
#
# The sampling CLI (mdm_jax.sample) is held to the same rule as the inference package it fronts.
# Every mdm_jax pattern must name an existing module (test_forbidden_rules_name_modules): a rule
# whose module was renamed would otherwise pass forever.
TRAIN_LOOP = "mdm_jax.train"  # the loop; the trainer core is mdm_jax.trainer
FORBIDDEN = (
    (("mdm_jax.model",), ("mdm_jax.data", TRAIN_LOOP),
     "the model is data-agnostic and usable without a trainer"),
    (("mdm_jax.objectives",), ("mdm_jax.data",),
     "objectives are data-agnostic: they see token arrays, never the data pipeline"),
    (("mdm_jax.data",), ("mdm_jax.model", TRAIN_LOOP),
     "the data pipeline is model-agnostic and usable without a trainer"),
    (("mdm_jax.config",), JAX,
     "loading an experiment config must be instant (no jax stack, not even through another "
     "mdm_jax module)"),
    (("mdm_jax.inference", "mdm_jax.eval", "mdm_jax.export", "mdm_jax.scaling", "mdm_jax.aot",
      "mdm_jax.autofit", "mdm_jax.sample"),
     (TRAIN_LOOP,),
     "they use the trainer core (mdm_jax.trainer), never the training loop (mdm_jax.train)"),
)

# README "Layout": modules that need not be listed (they are found by their package's entry).
LAYOUT_EXCLUDED_FILES = ("__init__.py", "__main__.py")
LAYOUT_EXCLUDED_DIRS = ("export/llada_remote/",)  # shipped Hugging Face remote code


# ------------------------------------------------------------------------------------------------
# The import graph
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    src: str  # the importing mdm_jax module
    dst: str  # an mdm_jax module, or a third-party/stdlib top-level package
    line: int  # 0 for the implied edge from a module to its package (see `runtime_successors`)
    lazy: bool = False  # inside a function: runs when the function is called


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    is_package: bool

    @property
    def package(self) -> str:
        """The package a relative import of this module starts from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass
class Graph:
    root: Path  # the directory holding the package directory
    modules: dict[str, Module]
    edges: list[Edge] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)  # imports of missing mdm_jax modules
    private: list[str] = field(default_factory=list)  # private names used across modules

    def where(self, module: str, line: int) -> str:
        return f"{self.modules[module].path.relative_to(self.root).as_posix()}:{line}"

    def is_internal(self, name: str) -> bool:
        return name == PACKAGE or name.startswith(PACKAGE + ".")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def matches(name: str, patterns) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


def discover(root: Path) -> dict[str, Module]:
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules[name] = Module(name, path, tree, is_package)
    return modules


class _ImportVisitor(ast.NodeVisitor):
    """Every Import/ImportFrom of a module, anywhere, with whether it sits inside a function."""

    def __init__(self):
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        self.found.append((node, self._depth > 0))

    visit_ImportFrom = visit_Import

    def visit_Call(self, node):
        # importlib.import_module("mdm_jax.x"), __import__("x"): an import where the name is
        # written out. A name computed at run time (a dispatch table) cannot be seen here.
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        arg = node.args[0] if node.args else None
        if (name in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str) and not arg.value.startswith(".")):
            imp = ast.copy_location(ast.Import(names=[ast.alias(name=arg.value)]), node)
            self.found.append((imp, self._depth > 0))
        self.generic_visit(node)


def from_source(mod, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names (a relative one from the module's package, up
    level - 1)."""
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(root: Path = REPO) -> Graph:
    graph = Graph(root, discover(root))
    modules = graph.modules
    for mod in modules.values():
        bindings: dict[str, str] = {}  # names bound to mdm_jax modules anywhere in this file
        visitor = _ImportVisitor()
        visitor.visit(mod.tree)
        for node, lazy in visitor.found:

            def edge(dst, node=node, lazy=lazy, mod=mod):
                graph.edges.append(Edge(mod.name, dst, node.lineno, lazy))

            def missing(what, node=node, mod=mod):
                graph.unresolved.append(
                    f"{graph.where(mod.name, node.lineno)} imports {what}, which does not exist")

            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not graph.is_internal(alias.name):
                        edge(alias.name.split(".")[0])
                    elif alias.name not in modules:
                        missing(alias.name)
                    else:
                        edge(alias.name)
                        if alias.asname:
                            bindings[alias.asname] = alias.name
                        else:  # `import mdm_jax.a.b` binds `mdm_jax`
                            bindings[PACKAGE] = PACKAGE
                continue
            source = from_source(mod, node)
            if not graph.is_internal(source):
                edge(source.split(".")[0])
                continue
            if source not in modules:
                missing(source)
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from mdm_jax import storage`: the submodule, and the
                    edge(sub)  # package too, whose __init__ the `from` statement names
                    if source != mod.name:  # (a package's own __init__ is no cycle)
                        edge(source)
                    bindings[alias.asname or alias.name] = sub
                else:  # a name of the module (or `*`)
                    edge(source)
                if is_private(alias.name) and source != mod.name:
                    graph.private.append(
                        f"{graph.where(mod.name, node.lineno)}: `from {source} import "
                        f"{alias.name}` imports the private name {alias.name} of {source}")

        # `a._helper` where `a` is (an attribute chain ending in) an imported mdm_jax module.
        # Bindings are per file, not per scope: a local variable shadowing an imported module's
        # name could be mistaken for it (none does today; the message says where to look).
        def resolve(expr, bindings=bindings):
            if isinstance(expr, ast.Name):
                return bindings.get(expr.id)
            if isinstance(expr, ast.Attribute):
                base = resolve(expr.value)
                if base and f"{base}.{expr.attr}" in modules:
                    return f"{base}.{expr.attr}"
            return None

        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                owner = resolve(node.value)
                if owner and owner != mod.name:
                    graph.private.append(
                        f"{graph.where(mod.name, node.lineno)}: `{ast.unparse(node)}` uses the "
                        f"private name {node.attr} of {owner}")
    graph.edges = list(dict.fromkeys(graph.edges))  # one per statement and target
    return graph


def internal_successors(graph: Graph) -> dict[str, dict[str, list[Edge]]]:
    """mdm_jax module -> imported mdm_jax module -> the import statements (explicit edges only)."""
    out: dict[str, dict[str, list[Edge]]] = {name: {} for name in graph.modules}
    for e in graph.edges:
        if graph.is_internal(e.dst):
            out[e.src].setdefault(e.dst, []).append(e)
    return out


def runtime_successors(graph: Graph, module: str) -> list[Edge]:
    """What importing `module` imports: its import statements, and its package's `__init__`,
    which Python runs before the module (the implied edge, line 0)."""
    edges = [e for e in graph.edges if e.src == module]
    if "." in module:
        edges.append(Edge(module, module.rpartition(".")[0], 0))
    return edges


def describe(graph: Graph, e: Edge) -> str:
    if e.line == 0:
        return f"{e.src} -> {e.dst} (its package __init__ runs first)"
    lazy = ", inside a function" if e.lazy else ""
    return f"{e.src} -> {e.dst} ({graph.where(e.src, e.line)}{lazy})"


# ------------------------------------------------------------------------------------------------
# The checks (each returns its failure messages; the tests below run them on mdm_jax and on a
# synthetic package with known violations)
# ------------------------------------------------------------------------------------------------


def find_cycles(graph: Graph) -> list[str]:
    """Import cycles among mdm_jax modules, as `a -> b -> a` with the lines of each import.

    Only explicit imports are edges: importing mdm_jax.x.y also runs mdm_jax/x/__init__.py, but
    that implied edge is not counted. A package whose `__init__` re-exports its submodules
    (mdm_jax.inference) would otherwise form a "cycle" with every submodule that imports a
    sibling, which Python resolves fine (the package is in sys.modules, partly initialised,
    before its submodules run): such cycles are harmless and their fix (empty `__init__`s) would
    cost the package its API. A submodule that names its own package in an import is an edge
    and is counted, for a name (`from mdm_jax.inference import load`) or a sibling (`from
    mdm_jax.inference import arm`: the `from` runs the package's `__init__` first); siblings are
    imported by their own module path (`from mdm_jax.inference.arm import sample_cached`).
    """
    succ = internal_successors(graph)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            strongconnect(v)

    messages = []
    for comp in components:
        if len(comp) == 1 and comp[0] not in succ[comp[0]]:
            continue
        members = set(comp)
        cycles = []  # the shortest cycle through each member, each cycle once
        for start in comp:
            parent = {start: None}
            queue = deque([start])
            found = None
            while queue and found is None:
                v = queue.popleft()
                for w in sorted(succ[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in parent:
                        parent[w] = v
                        queue.append(w)
            path = [start]
            v = found
            while v is not None and v != start:
                path.insert(1, v)
                v = parent[v]
            i = path.index(min(path))
            path = path[i:] + path[:i]
            if path not in cycles:
                cycles.append(path)
        for path in cycles:
            hops = list(zip(path, path[1:] + path[:1], strict=True))
            lines = "; ".join(
                f"{a} -> {b} at " + ", ".join(
                    graph.where(a, e.line) + (" (inside a function)" if e.lazy else "")
                    for e in succ[a][b])
                for a, b in hops)
            messages.append(f"import cycle {' -> '.join(path + path[:1])}  [{lines}]")
    return messages


def shortest_chain(graph: Graph, start: str, targets, cache: dict) -> tuple[Edge, ...] | None:
    """The shortest chain of runtime imports from `start` to a module matching `targets`
    (empty if `start` matches), or None."""
    if start not in cache:
        parent: dict[str, Edge | None] = {start: None}
        queue = deque([start])
        cache[start] = None
        while queue:
            v = queue.popleft()
            if matches(v, targets):
                path = []
                while parent[v] is not None:
                    path.insert(0, parent[v])
                    v = parent[v].src
                cache[start] = tuple(path)
                break
            if v not in graph.modules:
                continue
            for e in runtime_successors(graph, v):
                if e.dst not in parent:
                    parent[e.dst] = e
                    queue.append(e.dst)
    return cache[start]


def find_forbidden(graph: Graph, rules=FORBIDDEN) -> list[str]:
    """Arrows the rules forbid, each reported at the import statement that starts the chain,
    with the whole chain (shortest) to the forbidden module."""
    messages = []
    for sources, targets, reason in rules:
        label = f"{' | '.join(sources)} -> {' | '.join(targets)}"
        reach: dict[str, tuple[Edge, ...] | None] = {}  # module -> shortest chain to a target
        for name in sorted(graph.modules):
            if not matches(name, sources):
                continue
            reported: set[int] = set()  # one report per import statement
            for e in runtime_successors(graph, name):
                if matches(e.dst, sources) and not matches(e.dst, targets):
                    continue  # a module of the same side: reported at its own import, if at all
                chain = shortest_chain(graph, e.dst, targets, reach)
                if chain is None or (e.line and e.line in reported):
                    continue  # (`from pkg import sub` is an edge to pkg.sub and to pkg)
                reported.add(e.line)
                at = graph.where(name, e.line) if e.line else graph.where(name, 0)[:-2]
                how = " -> ".join([describe(graph, e)] + [describe(graph, c) for c in chain])
                messages.append(f"[{label}] {reason}\n    {at}: {how}")
    return messages


def stale_patterns(graph: Graph, rules=FORBIDDEN) -> list[str]:
    """mdm_jax patterns of the rules that match no module (renamed or misspelt)."""
    patterns = {p for sources, targets, _ in rules for p in (*sources, *targets)}
    return [f"FORBIDDEN names {p}, which matches no module of mdm_jax (renamed?)"
            for p in sorted(patterns)
            if graph.is_internal(p) and not any(matches(m, (p,)) for m in graph.modules)]


def check_package(graph: Graph) -> None:
    """Fails with every unresolved import (the graph would silently miss their edges)."""
    if graph.unresolved:
        pytest.fail("imports of mdm_jax modules that do not exist:\n" + "\n".join(
            graph.unresolved), pytrace=False)


# README "Layout" ---------------------------------------------------------------------------------

LAYOUT_FORMAT = """\
The Layout section's code block has an entry for the package: the line starting `mdm_jax/`
and the indented lines after it (up to the next line starting in column 0). In it every module
is written as its path relative to mdm_jax/ ending in .py (`model.py`, `inference/mdm.py`; an
optional `mdm_jax/` prefix is allowed) and a package directory as its path with a trailing
slash (`inference/`); free text may follow each (`train.py (the loop), trainer.py (the core)`).
Every module must be listed except __init__.py, __main__.py and the files under
export/llada_remote/ (whose directory must be listed); every path listed must exist."""

_PY_TOKEN = re.compile(r"(?<![\w/.:-])((?:[A-Za-z_]\w*/)*[A-Za-z_]\w*\.py)(?![\w/])")
_DIR_TOKEN = re.compile(r"(?<![\w/.:-])((?:[A-Za-z_]\w*/)+)(?![\w/.])")


def layout_entry(readme: str) -> str | None:
    section = re.search(r"^## Layout[^\n]*\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if section is None:
        return None
    block = re.search(r"^```[^\n]*\n(.*?)^```", section.group(1), re.M | re.S)
    if block is None:
        return None
    lines = block.group(1).splitlines()
    for i, line in enumerate(lines):
        if line.startswith(PACKAGE + "/"):
            entry = [line]
            for more in lines[i + 1:]:
                if more.strip() and not more[0].isspace():
                    break
                entry.append(more)
            return "\n".join(entry)
    return None


def layout_mismatches(readme: str, root: Path = REPO) -> list[str]:
    entry = layout_entry(readme)
    if entry is None:
        return ["README.md has no `## Layout` section with a code block holding an `mdm_jax/` "
                "entry\n" + LAYOUT_FORMAT]
    pkg = root / PACKAGE

    def strip(token):
        return token[len(PACKAGE) + 1:] if token.startswith(PACKAGE + "/") else token

    files = {strip(t) for t in _PY_TOKEN.findall(entry)}
    dirs = {strip(t) for t in _DIR_TOKEN.findall(entry)} - {""}
    messages = []
    for f in sorted(files):
        if not (pkg / f).is_file():
            messages.append(f"README Layout lists mdm_jax/{f}, which does not exist")
    for d in sorted(dirs):
        if not (pkg / d / "__init__.py").is_file():
            messages.append(f"README Layout lists mdm_jax/{d}, which is not a package")
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if "__pycache__" in path.parts or path.name in LAYOUT_EXCLUDED_FILES:
            continue
        if any(rel.startswith(d) for d in LAYOUT_EXCLUDED_DIRS):
            continue
        if rel not in files:
            messages.append(f"README Layout does not list mdm_jax/{rel}")
    for init in sorted(pkg.rglob("__init__.py")):
        d = init.parent.relative_to(pkg).as_posix() + "/"
        if d == "./" or "__pycache__" in init.parts:
            continue
        if d not in dirs and not any(f.startswith(d) for f in files):
            messages.append(f"README Layout does not list the package mdm_jax/{d}")
    if messages:
        messages.append(LAYOUT_FORMAT)
    return messages


# Console scripts ----------------------------------------------------------------------------------


def _top_level(body):
    """Statements that run at import, through `if`/`try`/`with` blocks (not into defs/classes)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                yield from _top_level(block)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)


def resolve_function(graph: Graph, module: str, name: str, seen=()) -> tuple[str, str] | str:
    """(module, name) of the `def` that `module.name` is, following re-exports between mdm_jax
    modules; or a string saying why it is not one."""
    if module not in graph.modules:
        return f"module {module} does not exist"
    if (module, name) in seen:
        return f"{module}.{name} re-exports itself"
    mod = graph.modules[module]
    found = f"{module} has no top-level {name}"
    for node in _top_level(mod.tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            found = (module, name)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) != name:
                    continue
                source = from_source(mod, node)
                if not graph.is_internal(source):
                    found = f"{module}.{name} is imported from {source}, outside mdm_jax"
                else:
                    found = resolve_function(graph, source, alias.name, (*seen, (module, name)))
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.Import | ast.ClassDef):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            names = ({t.id for t in targets if isinstance(t, ast.Name)}
                     | {(a.asname or a.name).split(".")[0] for a in getattr(node, "names", [])}
                     | ({node.name} if isinstance(node, ast.ClassDef) else set()))
            if name in names:
                found = f"{module}.{name} is not a function (def)"
    return found


def is_main_guard(node) -> bool:
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)):
        return False
    sides = [node.test.left, *node.test.comparators]
    return (len(sides) == 2 and isinstance(node.test.ops[0], ast.Eq)
            and any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def entry_points(graph: Graph) -> dict[str, tuple[int, list[tuple[str, str] | str]]]:
    """`python -m` name -> (line, the functions its main code calls, resolved to defs)."""
    out = {}
    for name, mod in sorted(graph.modules.items()):
        if name.endswith(".__main__"):
            command, body, line = name.rpartition(".")[0], list(mod.tree.body), 1
        else:
            guards = [n for n in mod.tree.body if is_main_guard(n)]
            if not guards:
                continue
            command, body, line = name, guards[0].body, guards[0].lineno
        calls = []
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue  # defined here, not run
            for node in ast.walk(stmt):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    calls.append(resolve_function(graph, name, node.func.id))
        out[command] = (name, line, calls)
    return out


def console_scripts(setup_cfg: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(setup_cfg)
    value = parser.get("options.entry_points", "console_scripts", fallback="")
    scripts = {}
    for line in value.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            script, _, target = line.partition("=")
            scripts[script.strip()] = target.strip()
    return scripts


def console_script_mismatches(graph: Graph, setup_cfg: str) -> list[str]:
    messages = []
    resolved = set()
    for script, target in console_scripts(setup_cfg).items():
        m = re.fullmatch(r"([\w.]+):(\w+)", target)
        if m is None:
            messages.append(f"console script {script} = {target}: not module:function")
            continue
        result = resolve_function(graph, m.group(1), m.group(2))
        if isinstance(result, str):
            messages.append(f"console script {script} = {target}: {result}")
        else:
            resolved.add(result)
    for command, (module, line, calls) in entry_points(graph).items():
        if not any(c in resolved for c in calls):
            called = [f"{c[0]}:{c[1]}" for c in calls if isinstance(c, tuple)]
            hint = f" (e.g. `mdm-... = {called[0]}`)" if called else ""
            messages.append(
                f"`python -m {command}` ({graph.where(module, line)}) has no console script in "
                f"setup.cfg [options.entry_points] console_scripts{hint}")
    return messages


# ------------------------------------------------------------------------------------------------
# The tests on mdm_jax
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(REPO)


def _fail(title, messages):
    if messages:
        pytest.fail(f"{title} ({len(messages)}):\n" + "\n".join(messages), pytrace=False)


def test_imports_resolve(graph):
    assert len(graph.modules) > 10 and len(graph.edges) > 50  # the reader found the package
    check_package(graph)


def test_no_import_cycles(graph):
    _fail("import cycles among mdm_jax modules", find_cycles(graph))


def test_no_private_names_across_modules(graph):
    _fail("private names used outside their module (make them public, or move the code)",
          graph.private)


def test_forbidden_rules_name_modules(graph):
    _fail("stale forbidden-arrow rules", stale_patterns(graph))


def test_no_forbidden_arrows(graph):
    _fail("forbidden imports", find_forbidden(graph))


def test_readme_layout_lists_the_modules():
    _fail("README.md Layout vs mdm_jax/",
          layout_mismatches((REPO / "README.md").read_text(encoding="utf-8")))


def test_every_cli_has_a_console_script(graph):
    _fail("command-line entry points vs setup.cfg console scripts",
          console_script_mismatches(graph, (REPO / "setup.cfg").read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------------
# Self-check: the checks on a synthetic package with known violations
# ------------------------------------------------------------------------------------------------

SYNTHETIC = {
    "__init__.py": "from mdm_jax import tools as _tools\n",
    "tools.py": "import os\n\ndef _helper():\n    pass\n",
    # a -> b at top level, b -> a inside a function through a relative import: a cycle
    "a.py": "from mdm_jax import b\n\ndef _own():\n    return b.public()\n",
    "b.py": ("def public():\n    from .a import _own  # noqa\n    return _own\n"),
    # private names: imported under try, and reached as attributes of imported modules
    "c.py": ("try:\n    from mdm_jax.tools import _helper\nexcept ImportError:\n    pass\n"
             "import mdm_jax.tools\nfrom mdm_jax import tools as t\n"
             "mdm_jax.tools._helper()\nt._helper()\nt.__name__\n_local = 1\n"),
    # config -> jax, transitively and only inside a function under an `if`
    "config.py": "def load():\n    if True:\n        from mdm_jax import model\n",
    "model.py": "import jax.numpy as jnp\nfrom mdm_jax.data import loader\n",
    "data/__init__.py": "from mdm_jax.data.loader import load\n",  # re-export: no cycle
    "data/loader.py": ("from mdm_jax.data.tokenizer import encode\nfrom .. import tools\n\n"
                       "def load():\n    pass\n"),
    "data/tokenizer.py": "import mdm_jax.helpers\n",  # data -> the loop, through helpers
    "helpers.py": ("from mdm_jax.train import loop\nimport importlib\n\n"
                   "def f():\n    return importlib.import_module('mdm_jax.tools')\n"),
    "train.py": "def loop():\n    pass\n",
    "cli/__init__.py": "",
    "cli/__main__.py": "from mdm_jax.cli.run import main\n\nmain()\n",
    "cli/run.py": "def main():\n    pass\n\nif __name__ == '__main__':\n    main()\n",
    "tool2.py": "def main():\n    pass\n\nif __name__ == '__main__':\n    main()\n",
}


@pytest.fixture()
def synthetic(tmp_path) -> Graph:
    for rel, text in SYNTHETIC.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return build_graph(tmp_path)


def test_self_check_cycles(synthetic):
    cycles = find_cycles(synthetic)
    assert len(cycles) == 1, cycles
    assert cycles[0].startswith("import cycle mdm_jax.a -> mdm_jax.b -> mdm_jax.a  [")
    assert "mdm_jax/a.py:1" in cycles[0]
    assert "mdm_jax/b.py:2 (inside a function)" in cycles[0]
    # an import of a submodule, and a package __init__ re-exporting it, make no cycle
    edges = {(e.src, e.dst) for e in synthetic.edges}
    assert ("mdm_jax.data.loader", "mdm_jax.data") not in edges
    assert ("mdm_jax.data.loader", "mdm_jax.tools") in edges  # `from .. import tools`
    assert Edge("mdm_jax.helpers", "mdm_jax.tools", 5, lazy=True) in synthetic.edges


def test_self_check_a_sibling_imported_through_its_package_is_a_cycle(tmp_path):
    files = {"__init__.py": "",
             "inference/__init__.py": "from mdm_jax.inference.generate import generate\n",
             "inference/generate.py": "from mdm_jax.inference import arm\n",
             "inference/arm.py": ""}
    for rel, text in files.items():
        (tmp_path / PACKAGE / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / rel).write_text(text)
    cycles = find_cycles(build_graph(tmp_path))
    assert [c.split("  [")[0] for c in cycles] == [
        "import cycle mdm_jax.inference -> mdm_jax.inference.generate -> mdm_jax.inference"]


def test_self_check_private_names(synthetic):
    private = sorted(synthetic.private)
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in private] == [
        "mdm_jax/b.py:2", "mdm_jax/c.py:2", "mdm_jax/c.py:7", "mdm_jax/c.py:8"], private
    assert "`mdm_jax.tools._helper()`" not in private[2]  # the attribute, not the call
    assert "`mdm_jax.tools._helper` uses the private name _helper of mdm_jax.tools" in private[2]
    assert "`t._helper` uses" in private[3]
    assert "import _own` imports the private name _own of mdm_jax.a" in private[0]


def test_self_check_forbidden_arrows(synthetic):
    found = find_forbidden(synthetic)
    assert len(found) == 3, found
    config, data, model = sorted(found, key=lambda m: m.split("\n")[1])
    assert config.startswith("[mdm_jax.config -> jax | jaxlib | flax | optax | orbax] loading")
    assert config.endswith(
        "\n    mdm_jax/config.py:3: mdm_jax.config -> mdm_jax.model "
        "(mdm_jax/config.py:3, inside a function) -> mdm_jax.model -> jax (mdm_jax/model.py:1)")
    # through a module outside the rule; the chain inside mdm_jax.data is reported once, at the
    # import that leaves it (not again at data/__init__.py and data/loader.py)
    assert data.startswith("[mdm_jax.data -> mdm_jax.model | mdm_jax.train] the data pipeline")
    assert data.endswith(
        "\n    mdm_jax/data/tokenizer.py:1: mdm_jax.data.tokenizer -> mdm_jax.helpers "
        "(mdm_jax/data/tokenizer.py:1) -> mdm_jax.helpers -> mdm_jax.train (mdm_jax/helpers.py:1)")
    assert model.startswith("[mdm_jax.model -> mdm_jax.data | mdm_jax.train] the model is")
    assert model.endswith(
        "\n    mdm_jax/model.py:2: mdm_jax.model -> mdm_jax.data.loader (mdm_jax/model.py:2)")
    # the package __init__ that Python runs first is on the chain: mdm_jax/__init__.py imports
    # tools, which imports os
    rules = ((("mdm_jax.data", "mdm_jax.nowhere"), ("os",), "x"),)
    assert stale_patterns(synthetic, rules) == [
        "FORBIDDEN names mdm_jax.nowhere, which matches no module of mdm_jax (renamed?)"]
    assert ("mdm_jax/data/__init__.py: mdm_jax.data -> mdm_jax (its package __init__ runs "
            "first) -> mdm_jax -> mdm_jax.tools (mdm_jax/__init__.py:1) -> mdm_jax.tools -> os "
            "(mdm_jax/tools.py:1)") in "\n".join(find_forbidden(synthetic, rules))


def test_self_check_unresolved(tmp_path):
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "x.py").write_text("def f():\n    from mdm_jax.trainer import T\n")
    assert build_graph(tmp_path).unresolved == [
        "mdm_jax/x.py:2 imports mdm_jax.trainer, which does not exist"]


def test_self_check_console_scripts(synthetic):
    cfg = ("[options.entry_points]\nconsole_scripts =\n    run = mdm_jax.cli.run:main\n"
           "    gone = mdm_jax.cli.run:nope\n    reexport = mdm_jax.cli.__main__:main\n")
    found = console_script_mismatches(synthetic, cfg)
    assert found == [
        "console script gone = mdm_jax.cli.run:nope: mdm_jax.cli.run has no top-level nope",
        "`python -m mdm_jax.tool2` (mdm_jax/tool2.py:4) has no console script in setup.cfg "
        "[options.entry_points] console_scripts (e.g. `mdm-... = mdm_jax.tool2:main`)"], found


def test_self_check_layout(synthetic):
    readme = ("# x\n\n## Layout\n\n```\nmdm_jax/      a.py, b.py (the b), c.py, config.py,\n"
              "              model.py; data/ (data/loader.py, mdm_jax/data/tokenizer.py);\n"
              "              cli/run.py, gone.py, nowhere/ (local and gs:// paths, I/O)\n"
              "experiments/  tools.py tool2.py\n```\n\n## Next\n\ntool2.py\n")
    found = layout_mismatches(readme, synthetic.root)
    assert found[:-1] == [
        "README Layout lists mdm_jax/gone.py, which does not exist",
        "README Layout lists mdm_jax/nowhere/, which is not a package",
        "README Layout does not list mdm_jax/helpers.py",
        "README Layout does not list mdm_jax/tool2.py",
        "README Layout does not list mdm_jax/tools.py",
        "README Layout does not list mdm_jax/train.py",
    ], found
    assert found[-1] == LAYOUT_FORMAT
