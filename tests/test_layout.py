"""The repository's shape (issues 26 and 36): the science in five short stage scripts and a small
common.py, each stage's main() a page of its method, the machinery one level down in lib/ (each
module saying what it is for and who uses it), imports in one direction, lines a reader can take
in, and no script that loads a stage file as a library."""
import ast
import glob
import os
import re

from helpers import ROOT

STAGES = sorted(glob.glob(os.path.join(ROOT, "0[1-5]_*.py")))
SCIENCE = STAGES + [os.path.join(ROOT, "common.py")]
LIB = sorted(glob.glob(os.path.join(ROOT, "lib", "*.py")))
# common.py grew past issue 26's 500 lines with issue 35's batched step; the five stages and
# common.py together stay within 2,000
LIMITS = {"common.py": 650, "01_prepare_data.py": 350}  # every other stage: 450


def lines(path):
    return open(path).read().count("\n")


def functions(path):
    return [n for n in ast.walk(ast.parse(open(path).read())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_stages_and_common_stay_short():
    sizes = {os.path.basename(p): lines(p) for p in SCIENCE}
    assert len(STAGES) == 5
    for name, n in sizes.items():
        assert n <= LIMITS.get(name, 450), (name, n)
    assert sum(sizes.values()) <= 2000, sizes


def test_no_function_in_the_science_files_is_over_80_lines():
    for path in SCIENCE:
        for node in functions(path):
            assert node.end_lineno - node.lineno + 1 <= 80, (os.path.basename(path), node.name)


def test_every_stage_main_reads_in_a_page():
    """arguments -> inputs -> the method -> save -> figure -> summary, in at most 30 lines: the
    runner (lib/plumbing.stage) holds the errors, interrupts, threads, device and timing."""
    for path in STAGES:
        main = [n for n in functions(path) if n.name == "main"]
        assert len(main) == 1, path
        assert main[0].end_lineno - main[0].lineno + 1 <= 30, (os.path.basename(path), main[0].end_lineno - main[0].lineno + 1)
        assert any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "stage" for d in main[0].decorator_list), path


def test_lines_of_the_science_files_fit_100_characters():
    for path in SCIENCE:
        long = [n for n, line in enumerate(open(path).read().split("\n"), 1) if len(line) > 100]
        assert not long, (os.path.basename(path), long)


def test_common_takes_plain_parameters_not_a_stages_arguments():
    for node in functions(os.path.join(ROOT, "common.py")):
        names = [a.arg for a in node.args.args + node.args.kwonlyargs]
        assert "args" not in names, node.name
        assert not any(isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "args"
                       for n in ast.walk(node)), node.name


def imports_of(path):
    """Every module a file imports, at any depth (inside functions too), as dotted names."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def lib_graph():
    """lib module -> the lib modules it imports."""
    mods = {os.path.basename(p)[:-3] for p in LIB} - {"__init__"}
    return {m: {i.split(".")[1] for i in imports_of(os.path.join(ROOT, "lib", f"{m}.py"))
                if i.startswith("lib.") and i.split(".")[1] in mods} for m in mods}


def find_cycle(graph):
    """A cycle of the graph as a list of nodes, or None (depth-first search)."""
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return path[path.index(m):] + [m] if m in path else [n, m]
            if m not in state:
                found = visit(m, path + [m])
                if found:
                    return found
        state[n] = "done"
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def test_imports_run_one_way_lib_below_common_and_no_cycles():
    """The rule lib/__init__.py states: lib/ sits below common.py and the stages; no lib module
    imports common.py, a stage or compare.py; common.py imports only lib/; lib's own imports form
    no cycle."""
    assert "lib/ sits below common.py" in open(os.path.join(ROOT, "lib", "__init__.py")).read()
    above = {"common", "compare"} | {os.path.basename(p)[:-3] for p in STAGES}
    for path in LIB:
        wrong = {i for i in imports_of(path) if i.split(".")[0] in above}
        assert not wrong, (os.path.basename(path), wrong)
    mine = {i.split(".")[0] for i in imports_of(os.path.join(ROOT, "common.py"))}
    assert not mine & above, mine & above
    assert find_cycle(lib_graph()) is None, find_cycle(lib_graph())


def test_the_cycle_finder_sees_a_cycle():
    """The check above could pass by finding nothing: it finds a cycle where there is one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_every_lib_module_says_what_it_is_for_and_who_uses_it():
    assert len(LIB) >= 6
    for path in LIB:
        doc = ast.get_docstring(ast.parse(open(path).read()))
        assert doc, path
        if not path.endswith("__init__.py"):
            assert re.search(r"\bUsed by\b", doc), (path, doc[:200])


def test_no_script_loads_a_stage_file_as_a_library():
    """Scripts import lib/ and common.py; only the tests name a stage file to run or test it."""
    scripts = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
               if "/tests/" not in p and "/.venv/" not in p]
    for path in scripts:
        text = open(path).read()
        assert "load_stage" not in text and "spec_from_file_location" not in text, path
        assert not re.search(r"import_module\(|runpy", text), path


def test_test_files_share_helpers_through_one_module():
    """Shared helpers live in tests/helpers.py: no test file imports another test file or conftest."""
    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        for name in imports_of(path):
            assert not name.split(".")[0].startswith(("test_", "conftest")), (os.path.basename(path), name)
