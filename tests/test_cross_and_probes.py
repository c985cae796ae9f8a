"""Stages 04 and 05 on a tiny study: the outputs, their meaning, and the bad-input paths."""
import os
import shutil

import numpy as np
import pytest

import common
from conftest import load_stage, run_stage

FAST = ["--epochs", "1", "--block-trs", "16", "--lora-rank", "4", "--lr-adapter", "3e-3", "--lr-readout", "1e-3",
        "--lora-targets", "q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def tuned(tiny_study, tmp_path_factory):
    """Baselines for both subjects, whole-cortex LoRA for both and AC LoRA for sim01 (1 epoch each)."""
    base = tmp_path_factory.mktemp("x")
    data = str(base / "data")
    shutil.copytree(tiny_study, data, ignore=shutil.ignore_patterns("features"))
    results, ckpt = str(base / "results"), str(base / "ckpt")
    common_args = ["--data", data, "--results", results]
    # a ridge search other than the default: stage 04's diagonal only equals stage 03's if both use it
    assert run_stage("02_baseline_ridge.py", common_args + ["--layers", "1", "--context-s", "4", "--stride-s", "2",
                                                            "--alphas", "3", "3000", "--n-folds", "4"]) == 0
    for subj, roi in [("sim01", "whole"), ("sim02", "whole"), ("sim01", "AC")]:
        assert run_stage("03_finetune_lora.py", common_args + ["--checkpoints", ckpt, "--subject", subj,
                                                               "--roi", roi] + FAST) == 0
    return data, results, ckpt


def test_cross_subject_matrix(tuned):
    data, results, ckpt = tuned
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt]) == 0
    out = common.load_npz(f"{results}/04_cross_subject.npz")
    assert list(out["tuned_on"]) == ["sim01", "sim02"] and list(out["evaluated_on"]) == ["sim01", "sim02"]
    assert out["mean_delta_r"].shape == (2, 2)
    # the diagonal is stage 03's own linearized score: same features, same recipe
    for s in ("sim01", "sim02"):
        r03 = common.load_npz(f"{results}/03_{s}_whole_lora_seed0.npz")
        np.testing.assert_allclose(out[f"test_r_{s}_on_{s}"], r03["test_r_tuned"], atol=1e-5)
        np.testing.assert_allclose(out["mean_delta_r"][["sim01", "sim02"].index(s)] [["sim01", "sim02"].index(s)],
                                   np.mean(r03["test_r_tuned"] - r03["test_r_baseline"]), atol=1e-5)
    assert os.path.exists(f"{results}/04_cross_subject.png")


def test_cross_subject_without_checkpoint(tuned, capsys, tmp_path):
    data, results, _ = tuned
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results,
                                             "--checkpoints", str(tmp_path)]) == 1
    assert "03_finetune_lora.py --subject sim01" in capsys.readouterr().err
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--tuned-on", "UTS01"]) == 1
    assert "unknown subject" in capsys.readouterr().err


def test_probes(tuned):
    data, results, ckpt = tuned
    assert run_stage("05_linear_probes.py", ["--data", data, "--results", results, "--checkpoints", ckpt,
                                             "--n-folds", "3"]) == 0
    out = common.load_npz(f"{results}/05_probes.npz")
    assert list(out["models"]) == ["baseline", "whole", "AC"]
    assert list(out["probes"]) == ["semantic", "acoustic", "category"]
    assert out["scores"].shape == (3, 4, 3)
    s = out["scores"]
    # acoustics are linearly there in every model; category accuracy is a fraction
    assert np.all(s[:, :, 1] > 0.3)
    assert np.all((s[:, :, 2] >= 0) & (s[:, :, 2] <= 1))
    assert os.path.exists(f"{results}/05_probes.png")


def test_probe_recovers_a_linear_target_and_holds_out_stories():
    m = load_stage("05_linear_probes.py")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 20)).astype(np.float32)
    Y = X[:, :3] @ rng.standard_normal((3, 4)).astype(np.float32)
    groups = np.repeat(np.arange(6), 50)
    assert m.probe(X, Y, groups, 3) > 0.95
    assert abs(m.probe(X, rng.standard_normal((300, 4)).astype(np.float32), groups, 3)) < 0.1
    cls = (X[:, 0] > 0).astype(int)
    assert m.probe(X, np.eye(2, dtype=np.float32)[cls], groups, 3, cls) > 0.9


def test_word_vectors_file(tmp_path):
    m = load_stage("05_linear_probes.py")
    p = tmp_path / "glove.txt"
    p.write_text("dog 0.1 0.2 0.3\ncat 0.0 1.0 2.0\nthe 1 1 1\n")
    vecs = m.read_word_vectors(str(p), {"dog", "cat", "zebra"})
    assert set(vecs) == {"dog", "cat"} and vecs["cat"][2] == 2.0
    with pytest.raises(common.StudyError, match="not found"):
        m.read_word_vectors(str(tmp_path / "none.txt"), {"dog"})
    p.write_text("dog 0.1 x 0.3\n")
    with pytest.raises(common.StudyError, match="GloVe"):
        m.read_word_vectors(str(p), {"dog"})


def test_probes_without_tuned_model(tuned, capsys, tmp_path):
    data, results, _ = tuned
    assert run_stage("05_linear_probes.py", ["--data", data, "--results", results, "--checkpoints", str(tmp_path)]) == 1
    assert "--roi whole" in capsys.readouterr().err
