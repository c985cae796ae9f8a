"""Stage 02 on a tiny simulated study, and its bad-input paths."""
import glob
import os
import shutil

import numpy as np
import pytest

import common
from lib import plumbing
from helpers import fails_cleanly, one, run_stage, stage
from lib.study import load_study, load_subject, stack_responses

STAGE = "02_baseline_ridge.py"


@pytest.fixture(scope="module")
def baseline(tiny_study, tmp_path_factory):
    results = str(tmp_path_factory.mktemp("results"))
    assert run_stage(STAGE, ["--data", tiny_study, "--results", results, "--layers", "0", "2"]) == 0
    return tiny_study, results


def test_reuse_links_results_made_from_the_same_inputs_settings_and_code(baseline, tmp_path, capsys):
    """--reuse DIR (make quick): stage 02 with the fixture's flags links its results instead of
    fitting again; other settings (another tag) are computed."""
    data, results = baseline
    mine = str(tmp_path / "mine")
    assert run_stage(STAGE, ["--data", data, "--results", mine, "--layers", "0", "2", "--reuse", results]) == 0
    assert "nothing to do (--reuse)" in capsys.readouterr().out
    for f in glob.glob(f"{results}/02_baseline_sim0*_*.npz"):
        assert os.path.samefile(f, os.path.join(mine, os.path.basename(f)))
    assert run_stage(STAGE, ["--data", data, "--results", mine, "--layers", "0", "--reuse", results]) == 0
    assert "nothing to do" not in capsys.readouterr().out


def test_baseline_outputs(baseline):
    data, results = baseline
    truth = plumbing.load_npz(f"{data}/truth.npz")
    for subj in truth["subjects"]:
        r = plumbing.load_npz(one(f"{results}/02_baseline_{subj}_*.npz"))  # --layers 0 2: tagged
        n_vox = len(truth[f"{subj}_kind"])
        assert r["test_r"].shape == (n_vox,) and r["val_r_by_layer"].shape == (2, n_vox)
        assert int(r["best_layer"]) in (0, 2) and r["alphas"].shape == (n_vox,)
        # the weights (1 GB per subject at real scale) stay out of the file later stages read whole
        assert "weights" not in r and str(r["model"]) == "tiny-pretrained"
        assert np.array_equal(r["sweep_voxels"], np.arange(n_vox))
        assert int(r["best_layer_own"]) == [0, 2][int(np.argmax(r["val_r_by_layer"].mean(1)))]
        # one layer for the study (--layer-choice study, the default): the best mean over its subjects
        study_mean = np.mean([plumbing.load_npz(one(f"{results}/02_baseline_{s}_*.npz"))["val_r_by_layer"].mean(1)
                              for s in truth["subjects"]], axis=0)
        assert int(r["best_layer"]) == [0, 2][int(np.argmax(study_mean))]
        assert list(r["layer_chosen_on"]) == list(truth["subjects"])
        kind = truth[f"{subj}_kind"]
        # sound-driven voxels are predicted from the tiny WavLM; pure-noise voxels are not
        assert r["test_r"][kind == 0].mean() > 0.3
        assert r["test_r"][kind == 0].mean() > r["test_r"][kind == 3].mean() + 0.2
    assert os.path.exists(one(f"{results}/02_baseline_*.png"))
    assert len(os.listdir(f"{data}/features/tiny-pretrained/context16s_stride4s")) == 5


def test_a_layer_chosen_on_fewer_subjects_is_another_result(baseline, tmp_path):
    """The study-wide layer depends on the subjects it was chosen on: a subset run gets its own file
    (tagged), never replacing the full run's; --layer-choice subject gives each its own best."""
    data, results = baseline
    out = str(tmp_path / "r")
    shutil.copytree(results, out)
    full = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert run_stage(STAGE, ["--data", data, "--results", out, "--layers", "0", "2", "--subjects", "sim01"]) == 0
    assert all(os.path.getmtime(os.path.join(out, f)) == t for f, t in full.items())
    new = [f for f in os.listdir(out) if f not in full and f.endswith(".npz")]
    assert len(new) == 1 and list(plumbing.load_npz(os.path.join(out, new[0]))["layer_chosen_on"]) == ["sim01"]
    assert run_stage(STAGE, ["--data", data, "--results", out, "--layers", "0", "2", "--layer-choice", "subject"]) == 0
    for f in [f for f in os.listdir(out) if f not in full and f.endswith(".npz") and f != new[0]]:
        r = plumbing.load_npz(os.path.join(out, f))
        assert int(r["best_layer"]) == int(r["best_layer_own"]) and len(r["layer_chosen_on"]) == 1


def test_each_window_setting_keeps_its_own_feature_cache(baseline, tmp_path, capsys):
    data, _ = baseline
    default = f"{data}/features/tiny-pretrained/context16s_stride4s"
    first = {f: os.path.getmtime(f"{default}/{f}") for f in os.listdir(default)}
    results = str(tmp_path / "r")
    assert run_stage(STAGE, ["--data", data, "--results", results, "--layers", "0", "1", "--context-s", "8",
                             "--subjects", "sim01", "--sweep-voxels", "20", "--save-weights"]) == 0
    assert len(os.listdir(f"{data}/features/tiny-pretrained/context8s_stride4s")) == 5
    assert {f: os.path.getmtime(f"{default}/{f}") for f in os.listdir(default)} == first  # untouched
    r = plumbing.load_npz(one(f"{results}/02_baseline_sim01_*.npz"))
    assert float(r["context_s"]) == 8.0
    # --sweep-voxels: layers compared on 20 voxels, the chosen one fit and scored on all 60
    assert len(r["sweep_voxels"]) == 20 and r["val_r_by_layer"].shape == (2, 20) and r["test_r"].shape == (60,)
    assert plumbing.load_npz(one(f"{results}/02_weights_sim01_*.npz"))["weights"].shape == (96 * 4, 60)
    # the random tiny model is still one flag away, with its own cache and its own result file
    assert run_stage(STAGE, ["--data", data, "--results", results, "--layers", "0", "--model", "tiny",
                             "--subjects", "sim01"]) == 0
    models = sorted(str(plumbing.load_npz(f)["model"]) for f in glob.glob(f"{results}/02_baseline_sim01_*.npz"))
    assert models == ["tiny", "tiny-pretrained"]
    assert len(os.listdir(f"{data}/features/tiny_seed0/context16s_stride4s")) == 5


@pytest.mark.parametrize("flags, msg", [
    (["--stride-s", "0.03"], "--stride-s 0.03 must be a positive multiple of WavLM's 20 ms frame"),
    (["--stride-s", "0"], "--stride-s 0 must be a positive multiple"),
    (["--context-s", "1.01"], "--context-s 1.01 must be a non-negative multiple"),
    (["--sweep-voxels", "-5"], "--sweep-voxels -5 is out of range"),
    (["--delays", "1", "9"], "--delays 9 is out of range: it must be <= 8"),
    (["--delays", "2", "2"], "repeats a delay"),
    (["--alphas", "1", "0"], "--alphas 0 is out of range: ridge penalties must be > 0"),
    (["--n-folds", "1"], "--n-folds 1 is out of range: it must be >= 2"),
    (["--n-folds", "two"], "argument --n-folds: invalid int value: 'two'"),
    (["--layers", "9"], "hidden states 0..3"),
])
def test_bad_flags_are_one_line_exit_1_and_write_nothing(tiny_study, tmp_path, capsys, flags, msg, monkeypatch):
    """Checked before any feature is computed: a feature pass would write the cache under data/."""
    results = str(tmp_path / "r")
    calls = []
    monkeypatch.setattr(common, "story_features", lambda *a, **k: calls.append(1))
    fails_cleanly(STAGE, ["--data", tiny_study, "--results", results] + flags, capsys, msg, results, tiny_study)
    assert not calls and not os.path.exists(results)


def test_bad_inputs(tiny_study, tmp_path, capsys):
    res = str(tmp_path / "r")
    assert run_stage(STAGE, ["--data", str(tmp_path / "none"), "--results", res]) == 1
    assert "01_prepare_data.py" in capsys.readouterr().err
    assert run_stage(STAGE, ["--data", tiny_study, "--results", res, "--subjects", "UTS09"]) == 1
    assert "unknown subject" in capsys.readouterr().err
    # an old layout: study.npz without the keys this layout needs
    old = tmp_path / "old"
    shutil.copytree(tiny_study, old, ignore=shutil.ignore_patterns("features"))
    st = plumbing.load_npz(old / "study.npz")
    del st["val_stories"]
    plumbing.save_npz(old / "study.npz", **st)
    assert run_stage(STAGE, ["--data", str(old), "--results", res]) == 1
    assert "older layout" in capsys.readouterr().err
    # a subject file with a story's responses missing
    st["val_stories"] = np.array(["val00"])
    plumbing.save_npz(old / "study.npz", **st)
    d = plumbing.load_npz(old / "subjects" / "sim01.npz")
    del d["resp_story01"]
    plumbing.save_npz(old / "subjects" / "sim01.npz", **d)
    assert run_stage(STAGE, ["--data", str(old), "--results", res]) == 1
    assert "no responses resp_story01" in capsys.readouterr().err
    assert not os.path.exists(res)


def test_unknown_model_offline(tiny_study, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert run_stage(STAGE, ["--data", tiny_study, "--results", str(tmp_path), "--model", "nobody/wavlm-x"]) == 1
    assert "could not load WavLM" in capsys.readouterr().err


def test_streamed_npz_and_stacked_responses_equal_the_plain_ones(tiny_study, tmp_path):
    """The memory-saving I/O (bench/scale.py): a generator written one array at a time reads back as
    np.savez would; responses stacked into one preallocated array equal np.vstack, voxel masks too."""
    arrays = {f"resp_{i}": np.random.default_rng(i).standard_normal((5 + i, 7)).astype(np.float32) for i in range(3)}
    drawn = []

    def gen():
        for k, v in arrays.items():
            drawn.append(k)  # produced only when its turn comes
            yield k, v
    plumbing.save_npz(tmp_path / "a.npz", gen(), test_resp=np.zeros((2, 7), np.float32))
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f:
        assert f.files == list(arrays) + ["test_resp"] and all(np.array_equal(f[k], v) for k, v in arrays.items())
    assert drawn == list(arrays)
    study = load_study(tiny_study)
    d = load_subject(tiny_study, "sim01", study)
    assert not isinstance(d, dict)  # opened lazily: each key is read when asked for
    ref = np.vstack([d[f"resp_{s}"] for s in study["train"]])
    assert np.array_equal(stack_responses(d, study["train"]), ref)
    mask = d["roi_AC"]
    assert np.array_equal(stack_responses(d, study["train"], mask), ref[:, mask])
    assert plumbing.array_shape(d, f"resp_{study['train'][0]}") == d[f"resp_{study['train'][0]}"].shape


@pytest.mark.parametrize("script", ["00_fetch_ds003020.py", "01_prepare_data.py", "02_baseline_ridge.py",
                                    "03_finetune_lora.py", "04_cross_subject.py", "05_linear_probes.py", "compare.py"])
def test_every_flag_says_what_it_does(script):
    parser = stage(script).get_parser()
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not silent, f"{script}: flags without help text: {silent}"


def test_reuse_never_links_results_made_by_other_code(baseline, tmp_path, capsys):
    """--reuse compares the code too: in a copy of the repository, stage 02 with the fixture's flags
    links the fixture's results while the code is the same, and fits again after an edit to
    common.py (a comment is enough: code is told by its files)."""
    import subprocess
    import sys
    from helpers import ROOT
    data, results = baseline
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=lambda d, names: [n for n in names if n in {
        ".git", ".venv", "data", "results", "checkpoints", "experiments", "tests", "bench", "docs", "figures",
        "__pycache__", "assets"} or n.startswith(("data.", "results_"))])

    def stage_02(out):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, STAGE, "--data", data, "--results", str(tmp_path / out), "--layers",
                               "0", "2", "--reuse", results], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout
    assert "nothing to do (--reuse)" in stage_02("same")
    with open(repo / "common.py", "a") as f:
        f.write("# an edit\n")
    out = stage_02("edited")
    assert "nothing to do" not in out and "layer 2: mean validation r" in out
    assert not any(os.path.samefile(f, os.path.join(results, os.path.basename(f)))
                   for f in glob.glob(f"{tmp_path}/edited/02_baseline_sim0*.npz"))
