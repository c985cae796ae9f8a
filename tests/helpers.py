"""Helpers the test files share: run a stage's main() in-process and check how it fails, find
results by pattern, and build pieces of a miniature ds003020 (TextGrids, pycortex databases).
conftest.py holds the fixtures; test files import these by name (`from helpers import ...`)."""
import glob
import importlib
import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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



def fresh_results(results, tmp_path, name):
    """A results folder holding only stage 02's results of `results`, and a checkpoint folder: room
    for one more stage 03 run."""
    res, ckpt = tmp_path / f"res_{name}", tmp_path / f"ckpt_{name}"
    res.mkdir()
    for f in os.listdir(results):
        if f.startswith("02_baseline_"):
            shutil.copy(os.path.join(results, f), res)
    return str(res), str(ckpt)


def ctrl_c_after_each_epoch(monkeypatch):
    """Ctrl-C right after each epoch's checkpoint (last/) is saved, as a user would; returns the
    real save, for monkeypatch.setattr(checkpoints, "save_checkpoint", real) to undo it."""
    from lib import checkpoints
    real = checkpoints.save_checkpoint

    def save_then_ctrl_c(folder, *a):
        real(folder, *a)
        if folder.endswith("last"):
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_ctrl_c)
    return real


def as_a_fresh_process(monkeypatch):
    """What a resumed run in a new process starts without: the kernels common.block_kernel cached
    in this process, emptied (for the rest of the test), so that a resumed run that depends on
    which block built a kernel first differs from the run that was never stopped."""
    import common
    monkeypatch.setattr(common, "_KERNELS", {})


# ---- a miniature ds003020 in the published layout ----

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



def write_textgrid(path, words, dur):
    iv = [("", 0.0, 0.3)] + [(w, 0.3 + i * 0.5, 0.7 + i * 0.5) for i, w in enumerate(words)]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0 ", f"xmax = {dur} ",
             "tiers? <exists> ", "size = 2 ", "item []: "]
    for n, (name, ivs) in enumerate([("phone", [("AH0", 0.0, dur)]), ("word", iv)], 1):
        lines += [f"    item [{n}]:", '        class = "IntervalTier" ', f'        name = "{name}" ',
                  "        xmin = 0 ", f"        xmax = {dur} ", f"        intervals: size = {len(ivs)} "]
        for k, (text, a, b) in enumerate(ivs, 1):
            lines += [f"        intervals [{k}]:", f"            xmin = {a} ", f"            xmax = {b} ",
                      f'            text = "{text}" ']
    open(path, "w").write("\n".join(lines) + "\n")
