"""The README's real-data recipe, run as written on a miniature ds003020.

The lines come from README.md (the fenced block after the 'real-data recipe' marker). Three
substitutions only: the dataset path becomes the fixture's, microsoft/wavlm-base-plus becomes this
repository's tiny pretrained WavLM, and stage 03 trains one epoch. The `make fetch` and `make
pycortex` lines are left out: there is no network here (tests/test_fetch.py runs the fetch with a
stand-in for openneuro-py) and the test set-up has installed pycortex.

The miniature is ds003020's layout: derivative/preprocessed_data/UTS0N/<story>.hf5 (`data`, the
test story with `individual_repeats`), stimuli/<story>.wav, derivative/TextGrids, respdict.json,
subject_xfms.json, english1000sm.hf5 (the lab's layout) and a pycortex-db per subject: pycortex's
S1 with a transform of 3x coarser voxels (2,965 columns, 36 of them AC), so stage 01 finds ROIs and
flatmaps with the real pycortex. Stories are short (25 rows each) so that the recipe's ten stage 03
runs take seconds each."""
import json
import os
import re
import shlex
import shutil

import h5py
import numpy as np
import pytest
from scipy.io import wavfile

import common
from lib import plumbing
from conftest import ROOT, one, run_stage
from test_prepare import write_textgrid

SUBJECTS = ["UTS01", "UTS02", "UTS03"]
STORIES = ["sweetaspie", "againstthewind", "myfathershands", "fromboyhoodtofatherhood", "waitingtogo",
           "wheretheressmoke"]
WORDS = ("dog cat horse bread apple cheese rain snow wind mother father sister car train boat "
         "hammer saw piano guitar house castle happy angry").split()
TRS = 45  # respdict's count: 25 response rows after the lab's trimming of 20


def recipe_lines():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- real-data recipe.*?-->\s*```(?:sh|bash)?\n(.*?)```", text, re.S)
    assert block, "README.md has no real-data recipe block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


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


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
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


def test_the_readme_recipe_runs_as_written(miniature, tmp_path, monkeypatch, capsys):
    root, n_vox = miniature
    monkeypatch.chdir(tmp_path)  # the recipe uses the default folders: data/, results/, checkpoints/
    ran = []
    for line in recipe_lines():
        if line.startswith("make "):
            assert line.split()[1] in ("fetch", "pycortex"), line
            continue
        line = line.replace("/data/ds003020", root).replace("microsoft/wavlm-base-plus", "tiny-pretrained")
        argv = shlex.split(line)
        assert argv[0] == "python", line
        if argv[1] == "03_finetune_lora.py":
            argv += ["--epochs", "1"]
        assert run_stage(argv[1], argv[2:]) == 0, (line, capsys.readouterr().err[-2000:])
        ran.append(argv[1])
    assert ran[:2] == ["01_prepare_data.py", "02_baseline_ridge.py"] and "05_linear_probes.py" in ran
    res = str(tmp_path / "results")
    # every stage's results for UTS01-UTS03, AC runs and probes included
    for subj in SUBJECTS:
        d = common.load_subject("data", subj, common.load_study("data"))
        assert d["roi_AC"].sum() == 36 and len(d["roi_AC"]) == n_vox[subj] and d["flat_index"].max() < n_vox[subj]
        one(f"{res}/02_baseline_{subj}_*.npz")
        one(f"{res}/03_{subj}_whole_lora_seed0_*.npz")
    assert len([f for f in os.listdir(res) if re.match(r"03_UTS01_whole_lora_seed\d_[0-9a-f]{6}\.npz$", f)]) == 3
    assert len([f for f in os.listdir(res) if re.match(r"03_UTS01_whole_full_seed\d_[0-9a-f]{6}\.npz$", f)]) == 3
    one(f"{res}/03_UTS01_AC_lora_seed0_*_from_*.npz")
    assert plumbing.load_npz(one(f"{res}/04_cross_subject_*.npz"))["mean_delta_r"].shape == (3, 3)
    probes = plumbing.load_npz(one(f"{res}/05_probes_*.npz"))
    assert list(probes["probes"]) == ["semantic", "acoustic"]  # English1000 from the dataset, no GloVe
    assert os.path.exists(one(f"{res}/02_flatmaps_*.png"))
