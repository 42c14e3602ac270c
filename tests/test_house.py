"""The house rules of the package layout (issue 11, and the rooms): imports form a DAG, only
the MPI gateway imports mpi4py, no module or function grows past a size a newcomer can read, no
folder holds more modules than one can keep in mind, and the folders depend on each other in one
direction only (:data:`ALLOWED`: the architecture in one place)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mpicellpose"
MAX_LINES = 450          # per module, "about 450"
MAX_FUNCTION_LINES = 60  # per function body, its docstring left out (argparse parser-building is exempt)
MAX_MODULES = 12         # per folder, its __init__ and __main__ left out

#: What sits directly in mpicellpose/: the public face, the run configuration and the errors, and
#: the folders (``models/`` holds the shipped weights: package data, no code).
TOP_LEVEL = {"__init__.py", "__main__.py", "_version.py", "api.py", "config.py", "errors.py", "options.py"}
FOLDERS = {"cellpose", "cli", "comm", "grid", "models", "runner", "synthetic", "tools", "training", "volumes"}

#: The rooms and which rooms each may import (a room: a folder, or one top-level module; importing
#: within a room is free).  Read from the bottom: errors and the configuration; comm (the only
#: MPI), grid (pure: no I/O, no MPI, no Cellpose); volumes (files); cellpose (the adapter to
#: Cellpose); runner (a run, its phases in runner/phases); the public calls (api), the tools behind
#: the other subcommands, the command line; synthetic data and training beside them, which may
#: use cellpose/ but which nothing of a run imports.
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "options": set(),  # the options declared once (stdlib only)
    "config": {"errors", "options"},
    "comm": {"errors"},
    "grid": {"errors"},
    "volumes": {"errors", "comm", "grid"},
    "cellpose": {"errors", "comm", "grid", "volumes"},
    "runner": {"errors", "_version", "config", "options", "comm", "grid", "volumes", "cellpose"},
    "synthetic": {"errors", "volumes", "cellpose"},
    "training": {"errors", "volumes", "cellpose", "synthetic"},
    "tools": {"errors", "config", "comm", "grid", "volumes", "cellpose", "runner", "synthetic"},
    "api": {"errors", "config", "comm", "runner"},
    "cli": {"errors", "config", "options", "comm", "grid", "volumes", "runner", "tools"},
    "__main__": {"cli"},
    "mpicellpose": {"_version", "api", "config", "grid", "runner", "volumes"},  # __init__: the public names, lazily
}

#: The modules outside runner/ that import a phase, and why (the command line never does; the
#: public calls go through the runner's public calls: driver.run, oneblock.segment_one_block).
PHASE_IMPORTERS = {
    # mpicellpose plan: the plan segment would make (make_plan, open_volume), without running it
    "mpicellpose.tools.dryrun",
    # mpicellpose check: the settings, kept blocks and global normalisation bounds of the whole volume,
    # so that the sample region is segmented with them (the runs themselves go through driver.run)
    "mpicellpose.tools.check",
}

#: What api.py may import of runner/: its public calls only.
API_RUNNER = {"mpicellpose.runner", "mpicellpose.runner.driver", "mpicellpose.runner.oneblock",
              "mpicellpose.runner.runlog"}  # runlog: the run's line format, shared with the command line

#: What grid/ may import besides itself and errors: pure computation only.
PURE_IMPORTS = {"__future__", "bisect", "collections", "dataclasses", "functools", "heapq", "itertools", "math",
                "numpy", "operator", "scipy", "typing"}


def modules() -> dict:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        tree = ast.parse(path.read_text())
        script = set()  # the `if __name__ == "__main__":` part runs as a script, not on import
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                script |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in script:
                continue
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                cands = [mod + "." + a.name for a in node.names]
                if node.module:
                    cands.append(mod)
                deps |= {c for c in cands if c in mods and c != name}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods and a.name != name}
        # importing a submodule runs its package's __init__: count parents, except one's own
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def test_imports_form_a_dag():
    graph = import_graph()
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if not state.get(u):
            visit(u, [])
    assert not cycles, cycles


def test_only_the_gateway_imports_mpi4py():
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpi4py"):
                users.append(name)
            elif isinstance(node, ast.Import) and any(a.name.startswith("mpi4py") for a in node.names):
                users.append(name)
    assert sorted(set(users)) == ["mpicellpose.comm"] or all(u.startswith("mpicellpose.comm") for u in users), users


def test_no_module_too_long():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


_PARSER_CALLS = {"add_argument", "add_parser", "add_argument_group", "add_mutually_exclusive_group",
                 "add_subparsers", "set_defaults", "_auto_on_off"}


def _builds_a_parser(fn) -> bool:
    """Most of ``fn``'s statements add arguments to an argparse parser (a declaration, not logic)."""
    calls = 0
    for stmt in fn.body:
        value = getattr(stmt, "value", None)
        func = getattr(value, "func", None)
        if isinstance(value, ast.Call) and getattr(func, "attr", getattr(func, "id", None)) in _PARSER_CALLS:
            calls += 1
    return calls * 2 >= len(fn.body)


def function_lengths() -> dict:
    """{module.function: lines of its body without the docstring} of every function."""
    out = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _builds_a_parser(node):
                continue
            n = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                n -= first.end_lineno - first.lineno + 1
            out[f"{name}.{node.name}:{node.lineno}"] = n
    return out


def test_no_function_too_long():
    assert {n: k for n, k in function_lengths().items() if k > MAX_FUNCTION_LINES} == {}


# --------------------------------------------------------------------------- the rooms
def room(module: str) -> str:
    """The room of a module: its folder (runner/phases is part of runner), or itself at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mpicellpose"


def test_only_the_allowed_modules_sit_at_the_top():
    entries = {p.name for p in PKG.iterdir() if not p.name.startswith((".", "__pycache__"))}
    assert {e for e in entries if e.endswith(".py")} == TOP_LEVEL
    assert {e for e in entries if (PKG / e).is_dir()} == FOLDERS
    assert not set(entries) - TOP_LEVEL - FOLDERS
    assert not list((PKG / "models").glob("*.py")), "models/ holds weights only (their code: cellpose/shipped.py)"


def test_no_folder_too_big():
    sizes = {}
    for d in [p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__"]:
        sizes[str(d.relative_to(PKG))] = len([f for f in d.glob("*.py") if f.name not in ("__init__.py",
                                                                                        "__main__.py")])
    assert {d: n for d, n in sizes.items() if n > MAX_MODULES} == {}


def test_rooms_import_only_what_they_may():
    bad = []
    for name, deps in import_graph().items():
        here = room(name)
        assert here in ALLOWED, f"{name}: a room the rules do not know ({here}); add it to ALLOWED"
        bad += [f"{name} -> {d}" for d in sorted(deps) if room(d) != here and room(d) not in ALLOWED[here]]
    assert bad == []


def test_nothing_of_a_run_imports_training_or_synthetic_data():
    bad = [f"{n} -> {d}" for n, deps in import_graph().items() for d in deps
           if room(n) in ("cellpose", "runner", "grid", "volumes", "comm") and room(d) in ("training", "synthetic")]
    assert bad == []


def test_only_the_command_line_imports_it():
    bad = [f"{n} -> {d}" for n, deps in import_graph().items() for d in deps
           if room(d) == "cli" and room(n) not in ("cli", "__main__")]
    assert bad == []


def test_the_phases_are_the_runs_own():
    importers = {n for n, deps in import_graph().items() for d in deps
                 if d.startswith("mpicellpose.runner.phases") and room(n) != "runner"}
    assert not {n for n in importers if room(n) == "cli"}, "the command line imports a phase"
    assert importers == PHASE_IMPORTERS


def test_the_public_calls_use_the_runners_public_calls():
    deps = import_graph()["mpicellpose.api"]
    assert {d for d in deps if room(d) == "runner"} <= API_RUNNER


def test_grid_is_pure():
    bad = []
    for name, path in modules().items():
        if room(name) != "grid":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            bad += [f"{name}: {t}" for t in tops if t not in PURE_IMPORTS]
    assert bad == []
