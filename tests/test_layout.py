"""The repository's shape: the science in five short stage scripts and a small
common.py, each stage's main() a page of its method, the machinery one level down in lib/ (each
module saying what it is for and who uses it), imports in one direction, lines a reader can take
in, and no script that loads a stage file as a library."""
import ast
import glob
import os
import re

import pytest

from helpers import ROOT

STAGES = sorted(glob.glob(os.path.join(ROOT, "0[1-5]_*.py")))
SCIENCE = STAGES + [os.path.join(ROOT, "common.py")]
LIB = sorted(glob.glob(os.path.join(ROOT, "lib", "*.py")))
# common.py grew past the redesign's (4a0415c) 500 lines with the batched step (1a7be3b); the five stages and
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


def module_name(path, root=ROOT):
    """A file's dotted module name (lib/plumbing.py -> lib.plumbing; lib/__init__.py -> lib)."""
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, root=ROOT):
    """Every module a file imports, at any depth (inside functions too), as dotted names; a relative
    import (from . import x, from .x import y) is resolved against the file's package, as Python
    resolves it."""
    package = module_name(path, root).split(".")
    if not path.endswith("__init__.py"):
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) + 1 - node.level] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            out |= {module} | {f"{module}.{a.name}".lstrip(".") for a in node.names}
    return out


def lib_graph(root=ROOT):
    """lib module -> the lib modules it imports."""
    mods = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "lib", "*.py"))} - {"__init__"}
    return {m: {i.split(".")[1] for i in imports_of(os.path.join(root, "lib", f"{m}.py"), root)
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


def import_rule_broken(root=ROOT):
    """How the tree at `root` breaks the rule lib/__init__.py states (an empty list when it holds):
    lib/ sits below common.py and the stages; no lib module imports common.py, a stage or
    compare.py; common.py imports only lib/; lib's own imports form no cycle."""
    above = {"common", "compare"} | {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "0[1-5]_*.py"))}
    broken = []
    for path in sorted(glob.glob(os.path.join(root, "lib", "*.py"))):
        wrong = {i for i in imports_of(path, root) if i.split(".")[0] in above}
        broken += [f"lib/{os.path.basename(path)} imports {', '.join(sorted(wrong))}"] if wrong else []
    mine = {i.split(".")[0] for i in imports_of(os.path.join(root, "common.py"), root)} & above
    broken += [f"common.py imports {', '.join(sorted(mine))}"] if mine else []
    cycle = find_cycle(lib_graph(root))
    return broken + ([f"a cycle in lib/: {' -> '.join(cycle)}"] if cycle else [])


def test_imports_run_one_way_lib_below_common_and_no_cycles():
    """The rule lib/__init__.py states, on this repository."""
    assert "lib/ sits below common.py" in open(os.path.join(ROOT, "lib", "__init__.py")).read()
    assert import_rule_broken() == []


@pytest.mark.parametrize("a, b, c", [
    ("from . import b", "from .a import helper", ""),  # relative imports both ways
    ("from .b import helper", "def later():\n    from . import c", "from lib import a"),  # through c, in a function
    ("import lib.b", "from lib.a import helper", ""),  # absolute imports, which the check read before
], ids=["relative", "relative-through-c-in-a-function", "absolute"])
def test_the_import_check_sees_a_cycle_made_by_any_import_form(tmp_path, a, b, c):
    """The check above could pass by not reading an import: on a small tree whose lib modules import
    each other in a cycle (relative imports included: Python follows them like any other), it sees
    that cycle; with the cycle's last import gone, nothing."""
    os.makedirs(tmp_path / "lib")
    files = {"common.py": "from lib import a", "lib/__init__.py": "", "lib/a.py": a, "lib/b.py": b, "lib/c.py": c}
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    broken = import_rule_broken(str(tmp_path))
    assert len(broken) == 1 and broken[0].startswith("a cycle in lib/: "), broken
    assert set(broken[0].split(": ")[1].split(" -> ")) == ({"a", "b", "c"} if c else {"a", "b"}), broken
    (tmp_path / ("lib/c.py" if c else "lib/b.py")).write_text("\n")
    assert import_rule_broken(str(tmp_path)) == []


def test_the_import_check_sees_lib_importing_common(tmp_path):
    """The check sees a lib module import common.py, at its top or inside one of its functions;
    common.py importing lib/ is the rule."""
    os.makedirs(tmp_path / "lib")
    for name, text in {"common.py": "", "lib/__init__.py": "", "lib/a.py": "import common",
                       "lib/b.py": "def later():\n    from common import zscore"}.items():
        (tmp_path / name).write_text(text + "\n")
    assert import_rule_broken(str(tmp_path)) == ["lib/a.py imports common", "lib/b.py imports common, common.zscore"]
    (tmp_path / "common.py").write_text("from lib import a\n")
    (tmp_path / "lib" / "a.py").write_text("\n")
    (tmp_path / "lib" / "b.py").write_text("\n")
    assert import_rule_broken(str(tmp_path)) == []


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


# ---- the code a result records: every module a stage runs ----

def reached_by_python(script, root=ROOT):
    """The repository's files Python's own modulefinder reaches from `script` (package __init__
    files, relative imports and imports inside functions included): a reading of the import graph
    independent of lib/provenance.py's, from the compiled code."""
    import modulefinder
    finder = modulefinder.ModuleFinder(path=[str(root)])  # this tree only: numpy, torch, ... are not followed
    finder.run_script(str(script))
    files = [os.path.abspath(m.__file__) for m in finder.modules.values() if m.__file__]
    return sorted(os.path.relpath(f, root) for f in files if f.startswith(os.path.abspath(root) + os.sep))


def test_a_stage_s_code_record_holds_every_module_it_imports():
    """What --reuse and run names compare (provenance.code_files, hashed by code_state) for each
    stage: the stage and every repository module it reaches by any import, lib/'s __init__ included
    (Python runs it), as Python's modulefinder finds them."""
    from lib import provenance
    for script in STAGES:
        files = provenance.code_files(script)
        assert files == reached_by_python(script), os.path.basename(script)
        assert {"common.py", "lib/__init__.py", "lib/plumbing.py", "lib/provenance.py"} <= set(files)


def test_code_files_follow_every_import_form(tmp_path, monkeypatch):
    """On a small tree: import a, import a.b (as c), from a import b, from a.b import name, relative
    imports (from . import x, from .x import y) and an import inside a function each bring in their
    files and the packages' __init__ files; a file nobody imports, or a module from elsewhere, does
    not."""
    from lib import provenance
    tree = {"stage.py": "import numpy\nimport alpha\nimport pkg.beta\nimport pkg.gamma as g\nfrom pkg import delta\n"
                        "from pkg.sub.epsilon import thing\n\n\ndef later():\n    from pkg import zeta\n",
            "alpha.py": "", "pkg/__init__.py": "", "pkg/beta.py": "from . import eta\n", "pkg/gamma.py": "",
            "pkg/delta.py": "from .sub import theta\n", "pkg/sub/__init__.py": "", "pkg/sub/epsilon.py": "",
            "pkg/sub/theta.py": "from ..iota import x\n", "pkg/zeta.py": "", "pkg/eta.py": "", "pkg/iota.py": "",
            "unused.py": "", "pkg/unused.py": ""}
    for name, text in tree.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(provenance, "ROOT", str(tmp_path))
    files = provenance.code_files(str(tmp_path / "stage.py"))
    assert files == reached_by_python(tmp_path / "stage.py", tmp_path)
    assert sorted(files) == sorted(set(tree) - {"unused.py", "pkg/unused.py"})


def test_an_edit_to_any_module_a_stage_imports_changes_its_code_fingerprint(tmp_path, monkeypatch):
    """In a copy of the repository's code: a comment added to any file stage 01 or stage 03 reaches
    changes the fingerprint that stage's results record (--reuse fits again, stage 03 names the
    run apart); the same edit to every file it does not reach leaves the fingerprint as it was."""
    import contextlib
    import shutil
    from lib import provenance
    os.makedirs(tmp_path / "lib")
    for path in glob.glob(os.path.join(ROOT, "*.py")) + LIB:
        shutil.copy(path, tmp_path / os.path.relpath(path, ROOT))
    monkeypatch.setattr(provenance, "ROOT", str(tmp_path))
    everything = {os.path.relpath(p, tmp_path) for p in glob.glob(f"{tmp_path}/**/*.py", recursive=True)}

    def fingerprint(script):
        provenance.code_state.cache_clear()  # it is cached per script for the life of a process
        return provenance.code_state(script)["fingerprint"]

    @contextlib.contextmanager
    def edited(files):
        texts = {f: (tmp_path / f).read_text() for f in files}
        for f, text in texts.items():
            (tmp_path / f).write_text(text + "# an edit\n")
        yield
        for f, text in texts.items():
            (tmp_path / f).write_text(text)
    try:
        for stage_file in ("01_prepare_data.py", "03_finetune_lora.py"):
            script = str(tmp_path / stage_file)
            before, reached = fingerprint(script), reached_by_python(script, tmp_path)
            assert len(reached) >= 10, reached
            for f in reached:
                with edited([f]):
                    assert fingerprint(script) != before, (stage_file, f)
            with edited(everything - set(reached)):
                assert fingerprint(script) == before, stage_file
            assert fingerprint(script) == before
    finally:
        provenance.code_state.cache_clear()
