"""The README's real-data recipe, run as a user types it: in a fresh shell, on a miniature ds003020.

The lines come from README.md (the fenced block after the 'real-data recipe' marker) and run, in
order, through one bash process (as in a terminal: `. .venv/bin/activate` in the block is what makes
`python` the project's), in a copy of the repository whose .venv is this test's environment. The
shell starts without this test's interpreter on PATH, so a line that needs the environment and runs
before it is activated fails here as it would for a user. Four substitutions only: the dataset path
becomes the fixture's, microsoft/wavlm-base-plus becomes this repository's tiny pretrained WavLM,
stage 02's windows carry 4 s of context instead of 16 (stages 03-05 take their windows from its
result: 17 s less in this test, the slowest of the suite) and stage 03 trains one epoch. The `make
fetch` and `make pycortex` lines are left out: there is no network here (tests/test_fetch.py runs
the fetch with a stand-in for openneuro-py) and the test set-up has installed pycortex.

The miniature (conftest.miniature) is ds003020's layout: derivative/preprocessed_data/UTS0N/<story>.hf5
(`data`, the test story with `individual_repeats`), stimuli/<story>.wav, derivative/TextGrids,
respdict.json, subject_xfms.json, english1000sm.hf5 (the lab's layout) and a pycortex-db per
subject: pycortex's S1 with a transform of 3x coarser voxels (2,965 columns, 36 of them AC), so
stage 01 finds ROIs and flatmaps with the real pycortex. Stories are short (25 rows each) so that
the recipe's nine stage 03 runs take seconds each."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

import common
from lib import plumbing
from helpers import ROOT, SUBJECTS, one
from lib.study import load_study, load_subject

pytest.importorskip("cortex", reason="pycortex is not installed (make pycortex builds it): the miniature's ROIs come from it")


def recipe_lines():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- real-data recipe.*?-->\s*```(?:sh|bash)?\n(.*?)```", text, re.S)
    assert block, "README.md has no real-data recipe block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_the_readme_recipe_runs_as_written(miniature, tmp_path, monkeypatch):
    root, n_vox = miniature
    repo = tmp_path / "repo"  # the user's checkout: the scripts, and .venv (this test's environment)
    skip = {".git", ".venv", "data", "results", "checkpoints", "experiments", "tests", "bench", "figures", "docs"}
    shutil.copytree(ROOT, repo, ignore=lambda d, names: [n for n in names if n == "__pycache__" or (
        os.path.abspath(d) == os.path.abspath(ROOT) and (n in skip or n.startswith(("data.", "results_"))))])
    if not os.path.exists(os.path.join(sys.prefix, "bin", "activate")):
        pytest.skip("the recipe activates .venv: run the tests in the project's environment (make test)")
    os.symlink(sys.prefix, repo / ".venv")
    script, ran = ["set -e"], []
    for line in recipe_lines():
        if line.startswith("make "):
            assert line.split()[1] in ("fetch", "pycortex"), line
            continue
        line = line.replace("/data/ds003020", root).replace("microsoft/wavlm-base-plus", "tiny-pretrained")
        argv = shlex.split(line)
        if argv[:2] == ["python", "02_baseline_ridge.py"]:
            line += " --context-s 4"
        if argv[:2] == ["python", "03_finetune_lora.py"]:
            line += " --epochs 1"
        if argv[0] == "python":
            ran.append(argv[1])
        script += [f"echo '>>> {line}'", line]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if os.path.realpath(d) != os.path.realpath(venv_bin))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, env=env, capture_output=True, text=True)
    last = [x for x in proc.stdout.splitlines() if x.startswith(">>> ")][-1:]
    assert proc.returncode == 0, (last, proc.stderr[-3000:])
    monkeypatch.chdir(repo)  # the recipe used the default folders: data/, results/, checkpoints/
    assert ran[:2] == ["01_prepare_data.py", "02_baseline_ridge.py"] and "05_linear_probes.py" in ran
    res = str(repo / "results")
    # every stage's results for UTS01-UTS03, AC runs and probes included
    for subj in SUBJECTS:
        d = load_subject("data", subj, load_study("data"))
        assert d["roi_AC"].sum() == 36 and len(d["roi_AC"]) == n_vox[subj] and d["flat_index"].max() < n_vox[subj]
        assert float(plumbing.load_npz(one(f"{res}/02_baseline_{subj}_*.npz"))["context_s"]) == 4.0
        one(f"{res}/03_{subj}_whole_lora_seed0_*.npz")
    assert len([f for f in os.listdir(res) if re.match(r"03_UTS01_whole_lora_seed\d_[0-9a-f]{6}\.npz$", f)]) == 3
    assert len([f for f in os.listdir(res) if re.match(r"03_UTS01_whole_full_seed\d_[0-9a-f]{6}\.npz$", f)]) == 3
    one(f"{res}/03_UTS01_AC_lora_seed0_*_from_*.npz")
    # the joint runs: their rows in stage 04's matrix, each subject scored by the joint run that never
    # saw it, and the data-efficiency curves
    for group in ("UTS01-UTS02-UTS03", "UTS02-UTS03", "UTS01-UTS03", "UTS01-UTS02"):
        one(f"{res}/03_joint-{group}_whole_lora_seed0_*.npz")
    cross = plumbing.load_npz(one(f"{res}/04_cross_subject_*.npz"))
    assert cross["mean_delta_r"].shape == (7, 3) and list(cross["tuned_on"])[:3] == SUBJECTS
    for subj in SUBJECTS:
        assert cross[f"unseen_{subj}"].shape == (3,) and np.isfinite(cross[f"unseen_{subj}"]).all()
        assert len(cross[f"efficiency_{subj}_untuned"]) == len(cross["efficiency_stories"])
    probes = plumbing.load_npz(one(f"{res}/05_probes_*.npz"))
    assert list(probes["probes"]) == ["semantic", "acoustic"]  # English1000 from the dataset, no GloVe
    assert os.path.exists(one(f"{res}/02_flatmaps_*.png"))
    # pycortex's WebGL viewer, each subject on its own surfaces from the dataset's pycortex-db
    assert ran[-1] == "viewer.py"
    viewer = os.listdir(f"{res}/viewer")
    assert "index.html" in viewer and all(f"{s}_[inflated]_mg2_9_v4.ctm" in viewer for s in SUBJECTS), viewer
