"""Shared test helpers: run a stage's main() in-process, and one tiny simulated study per session."""
import glob
import importlib
import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest
from scipy.io import wavfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib import plumbing  # noqa: E402

# torch's threads per test process: the machine's cores shared among pytest-xdist's workers (make test
# runs two), and the same count for the stage processes the tests start (BRAINWAVLM_THREADS)
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))
os.environ["BRAINWAVLM_THREADS"] = str(THREADS)
plumbing.set_threads(THREADS)

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


# make test runs two pytest-xdist workers, each taking a whole file at a time (--dist loadfile: a
# file's fixtures are built once) in this order (--no-loadscope-reorder): the longest files first,
# so that the workers finish together instead of one running the README recipe alone at the end
SLOWEST_FIRST = ["test_real_recipe.py", "test_gpu_check.py", "test_real_architecture.py", "test_cortex.py"]


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


# ---- a miniature ds003020 with pycortex databases: the real-data recipe and the fetch selection ----

SUBJECTS = ["UTS01", "UTS02", "UTS03"]
STORIES = ["sweetaspie", "againstthewind", "myfathershands", "fromboyhoodtofatherhood", "waitingtogo",
           "wheretheressmoke"]
WORDS = ("dog cat horse bread apple cheese rain snow wind mother father sister car train boat "
         "hammer saw piano guitar house castle happy angry").split()
TRS = 45  # respdict's count: 25 response rows after the lab's trimming of 20


def coarse_pycortex_db(db, subject, factor=3):
    """pycortex's S1 copied as `subject`, with a transform `<subject>_auto` of `factor`x larger voxels."""
    import cortex
    import nibabel as nib
    src = os.path.join(cortex.database.default_filestore, "S1")
    shutil.copytree(src, os.path.join(db, subject), ignore=shutil.ignore_patterns("cache", "retinotopy", "fullhead"))
    ref = nib.load(os.path.join(src, "transforms", "fullhead", "reference.nii.gz"))
    coord = np.array(json.load(open(os.path.join(src, "transforms", "fullhead", "matrices.xfm")))["coord"])
    shape = tuple(int(np.ceil(n / factor)) for n in ref.shape[:3])
    affine = ref.affine.copy()
    affine[:3, :3] *= factor
    reference = os.path.join(db, f"{subject}_reference.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), reference)
    cortex.db.filestore, cortex.db._subjects = db, None
    cortex.db.save_xfm(subject, f"{subject}_auto", np.diag([1 / factor] * 3 + [1.0]) @ coord, xfmtype="coord",
                       reference=reference)
    return int(np.asarray(cortex.db.get_mask(subject, f"{subject}_auto", "thick")).sum())


@pytest.fixture(scope="session")
def miniature(tmp_path_factory):
    """A miniature ds003020 in the published layout, with pycortex databases (test_real_recipe.py
    says what is in it). Skips where pycortex is missing."""
    pytest.importorskip("cortex", reason="pycortex is not installed (make pycortex builds it)")
    from test_prepare import write_textgrid
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
