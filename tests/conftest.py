"""The tests' fixtures (one tiny simulated study per session, the default study, a miniature
ds003020) and how make test's two workers share the files; the helpers they use are in helpers.py."""
import json
import os

import h5py
import numpy as np
import pytest
from scipy.io import wavfile

from helpers import STORIES, SUBJECTS, TINY, TRS, WORDS, coarse_pycortex_db, run_stage, write_textgrid
from lib import plumbing

# torch's threads per test process: the machine's cores shared among pytest-xdist's workers (make test
# runs two), and the same count for the stage processes the tests start (BRAINWAVLM_THREADS)
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))
os.environ["BRAINWAVLM_THREADS"] = str(THREADS)
plumbing.set_threads(THREADS)

# make test runs two pytest-xdist workers, each taking a whole file at a time (--dist loadfile: a
# file's fixtures are built once) in this order (--no-loadscope-reorder): the longest files first,
# so that the workers finish together instead of one running the README recipe alone at the end
SLOWEST_FIRST = ["test_real_recipe.py", "test_viewer.py", "test_gpu_check.py", "test_real_architecture.py",
                 "test_cortex.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


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


@pytest.fixture(scope="session")
def miniature(tmp_path_factory):
    """A miniature ds003020 in the published layout, with pycortex databases (test_real_recipe.py
    says what is in it). Skips where pycortex is missing."""
    pytest.importorskip("cortex", reason="pycortex is not installed (make pycortex builds it)")
    root = str(tmp_path_factory.mktemp("recipe") / "ds003020")
    rng = np.random.default_rng(0)
    for d in ("stimuli", "derivative/TextGrids", "derivative/pycortex-db"):
        os.makedirs(f"{root}/{d}")
    json.dump({s: TRS for s in STORIES}, open(f"{root}/derivative/respdict.json", "w"))
    json.dump({s: f"{s}_auto" for s in SUBJECTS}, open(f"{root}/derivative/subject_xfms.json", "w"))
    n_vox = {s: coarse_pycortex_db(f"{root}/derivative/pycortex-db", s) for s in SUBJECTS}
    dur = 2 * TRS - 20
    loud = {}
    for st in STORIES:
        t = np.arange(dur * 16000) / 16000
        loud[st] = 1 + 0.8 * np.sin(2 * np.pi * t / rng.uniform(7, 13) + rng.uniform(0, 6))
        x = rng.standard_normal(len(t)) * 0.1 * loud[st]
        wavfile.write(f"{root}/stimuli/{st}.wav", 16000, (x * 32767 / 0.6).clip(-32767, 32767).astype(np.int16))
        words = list(rng.choice(WORDS, 40)) + ["{LG}", "sp"]
        iv = [(w, 0.5 + 1.5 * i, 1.4 + 1.5 * i) for i, w in enumerate(words)]
        write_textgrid(f"{root}/derivative/TextGrids/{st}.TextGrid", [w for w, _, _ in iv], dur)
    rows = TRS - 20
    for subj in SUBJECTS:
        os.makedirs(f"{root}/derivative/preprocessed_data/{subj}")
        w = rng.standard_normal(n_vox[subj])
        for st in STORIES:
            tr = 11.0 + 2.0 * np.arange(rows)
            sig = np.interp(tr - 4.0, np.arange(len(loud[st])) / 16000, loud[st])[:, None] * w
            with h5py.File(f"{root}/derivative/preprocessed_data/{subj}/{st}.hf5", "w") as f:
                if st == "wheretheressmoke":
                    reps = sig + rng.standard_normal((10, rows, n_vox[subj]))
                    f.create_dataset("data", data=reps.mean(0).astype(np.float32))
                    f.create_dataset("individual_repeats", data=reps.astype(np.float32))
                else:
                    f.create_dataset("data", data=(sig + rng.standard_normal(sig.shape)).astype(np.float32))
    with h5py.File(f"{root}/derivative/english1000sm.hf5", "w") as f:  # the lab's layout: dims x words
        f.create_dataset("data", data=rng.standard_normal((12, len(WORDS))))
        f.create_dataset("vocab", data=np.array([w.encode() for w in WORDS]))
    return root, n_vox
