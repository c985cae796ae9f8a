"""The repository's shape (issue 26): the science in five short stage scripts and a small common.py,
the machinery one level down in lib/, each module saying what it is for and who uses it, and no
script that loads a stage file as a library."""
import ast
import glob
import os
import re

from conftest import ROOT

STAGES = sorted(glob.glob(os.path.join(ROOT, "0[1-5]_*.py")))
LIMITS = {"common.py": 500, "01_prepare_data.py": 350}  # every other stage: 450


def lines(path):
    return open(path).read().count("\n")


def test_the_stages_and_common_stay_short():
    sizes = {os.path.basename(p): lines(p) for p in STAGES + [os.path.join(ROOT, "common.py")]}
    assert len(STAGES) == 5
    for name, n in sizes.items():
        assert n <= LIMITS.get(name, 450), (name, n)
    assert sum(sizes.values()) <= 2000, sizes


def test_no_function_in_the_science_files_is_over_80_lines():
    for path in STAGES + [os.path.join(ROOT, "common.py")]:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, (os.path.basename(path), node.name)


def test_every_lib_module_says_what_it_is_for_and_who_uses_it():
    modules = sorted(glob.glob(os.path.join(ROOT, "lib", "*.py")))
    assert len(modules) >= 6
    for path in modules:
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
