"""Shared test helpers: run a stage's main() in-process, and one tiny simulated study per session."""
import glob
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import plumbing  # noqa: E402

plumbing.set_threads(2)

TINY = ["--cortex", "none", "--n-subjects", "2", "--n-voxels", "60", "--n-train-stories", "3", "--n-val-stories", "1",
        "--story-seconds", "60", "--test-seconds", "60", "--seed", "3"]


def stage(script):
    """A script of this repository as a module, for the tests of its own functions and run_stage
    (importlib: a stage's name starts with a digit, so the `import` statement cannot name it)."""
    return importlib.import_module(os.path.splitext(script)[0].replace("/", "."))


def run_stage(script, argv):
    """Run a stage's main(argv); return its exit code (0 when it returns normally)."""
    try:
        stage(script).main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("study") / "data")
    assert run_stage("01_prepare_data.py", ["--data", data] + TINY) == 0
    return data


@pytest.fixture(scope="session")
def default_study(tmp_path_factory):
    """The default simulated study (what `make demo` builds: S1's cortex)."""
    data = str(tmp_path_factory.mktemp("default") / "data")
    assert run_stage("01_prepare_data.py", ["--data", data]) == 0
    return data


def one(pattern):
    """The one file or folder matching a glob: results made with other settings than the defaults
    carry a tag in their names (03_sim01_whole_lora_seed0_1a2b3c.npz)."""
    found = sorted(glob.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def snapshot(*folders):
    """Every file under `folders` with its size and modification time: equal snapshots before and
    after a failed command mean it wrote nothing."""
    out = {}
    for folder in folders:
        for d, _, files in os.walk(folder):
            for f in files:
                st = os.stat(os.path.join(d, f))
                out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


def fails_cleanly(script, argv, capsys, msg, *folders):
    """The stages' contract for bad input: exit 1, one `error:` line containing msg, nothing written
    under `folders` (which may not exist yet)."""
    before = snapshot(*folders)
    capsys.readouterr()
    code = run_stage(script, argv)
    err = capsys.readouterr().err
    assert code == 1, (code, err)
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert msg in err, err
    assert snapshot(*folders) == before, "a failed command wrote files"
    return err
