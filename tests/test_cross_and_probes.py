"""Stages 04 and 05 on a tiny study: the outputs, their meaning, provenance and the bad-input paths.
Also the stale-input scenarios: a rebuilt study, a stage 02 rerun, subsets that must not replace
the full results."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

import common
from lib import batching, ds003020, plumbing
from helpers import TINY, fails_cleanly, one, run_stage
from lib.study import load_study, load_subject

FAST = ["--epochs", "1", "--block-trs", "16", "--lora-rank", "4", "--lr-adapter", "3e-3", "--lr-readout", "1e-3",
        "--lora-targets", "q_proj", "k_proj", "v_proj", "out_proj"]
GRID = ["--alphas", "3", "3000", "--n-folds", "4"]  # not the defaults: stage 04 must score with these
MARGIN = 0.04  # the aligned semantic probe over its shifted-target control: 0.282 against 0.197 measured


@pytest.fixture(scope="module")
def tuned(tiny_study, tmp_path_factory):
    """Baselines for both subjects, whole-cortex LoRA for both and AC LoRA for sim01 (1 epoch each)."""
    base = tmp_path_factory.mktemp("x")
    data = str(base / "data")
    shutil.copytree(tiny_study, data, ignore=shutil.ignore_patterns("features"))
    results, ckpt = str(base / "results"), str(base / "ckpt")
    common_args = ["--data", data, "--results", results]
    assert run_stage("02_baseline_ridge.py", common_args + ["--layers", "1", "--context-s", "4", "--stride-s", "2"]
                     + GRID) == 0
    for subj, roi in [("sim01", "whole"), ("sim02", "whole"), ("sim01", "AC")]:
        assert run_stage("03_finetune_lora.py", common_args + ["--checkpoints", ckpt, "--subject", subj,
                                                               "--roi", roi] + FAST) == 0
    return data, results, ckpt


def _copy(tuned, tmp_path):
    """A private copy of the tuned study's results (the data and checkpoints are shared, read-only)."""
    data, results, ckpt = tuned
    out = str(tmp_path / "results")
    shutil.copytree(results, out)
    return data, out, ckpt


def test_cross_subject_matrix(tuned, tmp_path):
    data, results, ckpt = _copy(tuned, tmp_path)
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt]) == 0
    out = plumbing.load_npz(one(f"{results}/04_cross_subject_*.npz"))  # the runs' settings tag is in the name
    assert list(out["tuned_on"]) == ["sim01", "sim02"] and list(out["evaluated_on"]) == ["sim01", "sim02"]
    assert out["mean_delta_r"].shape == (2, 2)
    study = load_study(data)
    for i, a in enumerate(["sim01", "sim02"]):
        r03 = plumbing.load_npz(one(f"{results}/03_{a}_whole_lora_seed0_*.npz"))
        # the diagonal is stage 03's own linearized score: same features, same recipe
        np.testing.assert_allclose(out[f"test_r_{a}_on_{a}"], r03["test_r_tuned"], atol=1e-5)
        np.testing.assert_allclose(out["mean_delta_r"][i, i], np.mean(r03["test_r_tuned"] - r03["test_r_baseline"]),
                                   atol=1e-5)
        # off the diagonal: a's tuned features, scored here on the other subject's data with that
        # subject's recipe and baseline; scoring on the wrong subject would not match this
        b = "sim02" if a == "sim01" else "sim01"
        base_b = plumbing.load_npz(one(f"{results}/02_baseline_{b}_*.npz"))
        feats = {s: plumbing.load_npz(f"{data}/features/{r03_name(results, a)}/{s}.npz")["ds"][int(r03["layer"])]
                 for s in study["train"] + study["val"] + [study["test"]]}
        r, _, _ = common.score_on_test(feats, load_subject(data, b, study), study,
                                       **common.ridge_recipe(base_b))
        np.testing.assert_allclose(out[f"test_r_{a}_on_{b}"], r, atol=1e-5)
        np.testing.assert_allclose(out[f"delta_r_{a}_on_{b}"], r - base_b["test_r"], atol=1e-5)
        assert not np.allclose(out[f"test_r_{a}_on_{b}"], out[f"test_r_{a}_on_{a}"])
    assert os.path.exists(one(f"{results}/04_cross_subject_*.png"))


def _ridge_r_independently(X, Y, X_test, Y_test, alphas, n_folds):
    """Per-voxel-alpha ridge by himalaya (not this repository's ridge_cv), Pearson r on the test rows."""
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score
    set_backend("numpy")
    edges = np.linspace(0, len(X), n_folds + 1).astype(int)
    idx = np.arange(len(X))
    folds = [(np.r_[idx[:a], idx[b:]], idx[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    model = RidgeCV(alphas=np.asarray(alphas, np.float64), cv=folds, solver="svd", fit_intercept=False,
                    solver_params=dict(score_func=correlation_score, local_alpha=True)).fit(X, Y)
    pred = X_test @ np.asarray(model.coef_)
    p, y = pred - pred.mean(0), Y_test - Y_test.mean(0)
    return (p * y).sum(0) / np.sqrt((p * p).sum(0) * (y * y).sum(0))


def test_cross_subject_scores_on_b_with_b_s_own_recipe(tuned, tmp_path):
    """sim02's stage 02 result is given other delays, alphas and folds than sim01's (in the file;
    its record unchanged): sim01's model scored on sim02 must use sim02's recipe. The expected r is
    computed here with himalaya's RidgeCV, and sim01's recipe gives a clearly different one."""
    data, results, ckpt = _copy(tuned, tmp_path)
    base_path = one(f"{results}/02_baseline_sim02_*.npz")
    b = plumbing.load_npz(base_path)
    b.update(delays=np.array([1, 2]), alpha_grid=np.array([10.0, 1000.0]), n_folds=np.int64(3))
    plumbing.save_npz(base_path, **b)
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt,
                                             "--tuned-on", "sim01", "--evaluate-on", "sim02"]) == 0
    got = plumbing.load_npz(one(f"{results}/04_cross_subject_*sim01-on-sim02.npz"))["test_r_sim01_on_sim02"]
    study = load_study(data)
    r03 = plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
    feats = {s: plumbing.load_npz(f"{data}/features/{r03_name(results, 'sim01')}/{s}.npz")["ds"][int(r03["layer"])]
             for s in study["train"] + study["val"] + [study["test"]]}
    with np.load(f"{data}/subjects/sim02.npz") as d:
        Y = np.vstack([d[f"resp_{s}"] for s in study["train"] + study["val"]])
        Y_test = d["test_resp"]

    def expected(delays, alphas, n_folds):
        X = np.vstack([common.design_matrix(feats[s], delays) for s in study["train"] + study["val"]])
        return _ridge_r_independently(X, Y, common.design_matrix(feats[study["test"]], delays), Y_test, alphas, n_folds)
    mine = expected((1, 2), [10.0, 1000.0], 3)
    theirs = expected((1, 2, 3, 4), [3.0, 3000.0], 4)  # sim01's recipe (GRID, the paper's delays)
    assert np.abs(theirs - mine).max() > 0.05  # the two recipes really differ here
    assert np.mean(np.abs(got - mine) < 1e-3) > 0.95 and abs(got.mean() - mine.mean()) < 1e-3


def test_cross_subject_gain_is_like_for_like_when_layers_differ(tuned, tmp_path):
    """sim01's model tuned and read out at layer 2, where the stage 02 baselines are at layer 1: its
    gain on each subject is against the untuned model at layer 2 with that subject's recipe (stage
    02's own test r at layer 2, run here apart), in stage 04 and in stage 03's own result; the gain
    against the subject's best baseline is saved beside it, and differs."""
    data, results, ckpt = _copy(tuned, tmp_path)
    ck = str(tmp_path / "ck")
    assert run_stage("03_finetune_lora.py", ["--data", data, "--results", results, "--checkpoints", ck,
                                             "--subject", "sim01", "--layer", "2"] + FAST) == 0
    r03 = next(r for r in (plumbing.load_npz(f) for f in glob.glob(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
               if int(r["layer"]) == 2)
    tag = json.loads(str(r03["provenance"]))["tag"]
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ck, "--tuned-on",
                                             "sim01", "--tag", tag]) == 0
    out = plumbing.load_npz(one(f"{results}/04_cross_subject_{tag}_sim01-on-sim01-sim02.npz"))
    apart = str(tmp_path / "layer2")
    assert run_stage("02_baseline_ridge.py", ["--data", data, "--results", apart, "--layers", "2", "--context-s", "4",
                                              "--stride-s", "2"] + GRID) == 0
    for j, b in enumerate(["sim01", "sim02"]):
        at_2 = plumbing.load_npz(one(f"{apart}/02_baseline_{b}_*.npz"))["test_r"]
        best = plumbing.load_npz(one(f"{results}/02_baseline_{b}_*.npz"))
        r = out[f"test_r_sim01_on_{b}"]
        np.testing.assert_allclose(out[f"delta_r_sim01_on_{b}"], r - at_2, atol=1e-5)
        np.testing.assert_allclose(out["mean_delta_r"][0, j], np.mean(r - at_2), atol=1e-5)
        np.testing.assert_allclose(out["mean_delta_r_vs_best"][0, j], np.mean(r - best["test_r"]), atol=1e-5)
        assert int(best["best_layer"]) == 1 and abs(np.mean(at_2 - best["test_r"])) > 1e-3  # the yardsticks differ
        if b == "sim01":
            np.testing.assert_allclose(r03["test_r_untuned"], at_2, atol=1e-5)


def r03_name(results, subject):
    return os.path.basename(one(f"{results}/03_{subject}_whole_lora_seed0_*.npz"))[:-4]


def test_a_subset_writes_its_own_file_and_replaces_nothing(tuned, tmp_path):
    data, results, ckpt = _copy(tuned, tmp_path)
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt]) == 0
    full = one(f"{results}/04_cross_subject_*.npz")
    mtime = os.path.getmtime(full)
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt,
                                             "--tuned-on", "sim01", "--evaluate-on", "sim01"]) == 0
    assert os.path.getmtime(full) == mtime and plumbing.load_npz(full)["mean_delta_r"].shape == (2, 2)
    assert plumbing.load_npz(one(f"{results}/04_cross_subject_*_sim01-on-sim01.npz"))["mean_delta_r"].shape == (1, 1)
    # stage 02 on one subject draws its own figure, not over the two-subject one
    figs = sorted(f for f in os.listdir(results) if f.startswith("02_baseline") and f.endswith(".png"))
    assert run_stage("02_baseline_ridge.py", ["--data", data, "--results", results, "--layers", "1", "--context-s", "4",
                                              "--stride-s", "2", "--subjects", "sim01"] + GRID) == 0
    assert sorted(f for f in os.listdir(results) if f.startswith("02_baseline") and f.endswith(".png")) == sorted(
        figs + [figs[0].replace(".png", "_sim01.png")])


def test_a_rebuilt_study_is_refused_not_mixed(tuned, tmp_path, capsys):
    """The first stale-input scenario: rebuild the study with other noise, then stage 04 (or 03) must
    refuse the old results with one line saying why and how to rebuild them, never print a delta."""
    data, results, ckpt = tuned
    new = str(tmp_path / "data")
    shutil.copytree(data, new)
    assert run_stage("01_prepare_data.py", ["--data", new] + TINY + ["--noise-sd", "1.5", "3.0"]) == 0
    assert "the same stories; subjects sim01, sim02 differ" in capsys.readouterr().out
    err = fails_cleanly("04_cross_subject.py", ["--data", new, "--results", results, "--checkpoints", ckpt], capsys,
                        "was built from another study", results)
    assert "sim01's responses differ" in err and f"python 03_finetune_lora.py --data {new} --results {results}" in err
    # stage 03 on the new study with these results: the stage 02 result is refused before any training
    fails_cleanly("03_finetune_lora.py", ["--data", new, "--results", results, "--checkpoints", ckpt, "--subject",
                                          "sim01"], capsys, "02_baseline_sim01", results, ckpt)
    fails_cleanly("05_linear_probes.py", ["--data", new, "--results", results, "--checkpoints", ckpt], capsys,
                  "was built from another study", results)
    # the feature caches survived the rebuild (stage 01 keeps data/features/)
    assert os.path.isdir(f"{new}/features")


def test_a_stage_02_rerun_never_changes_what_a_run_is_compared_with(tuned, tmp_path, capsys):
    """Other delays in stage 02 write another file: stage 04 keeps comparing each run with the
    result it was scored against. A stage 02 result whose inputs changed under the same name is
    refused for the runs scored against the old one."""
    data, results, ckpt = _copy(tuned, tmp_path)
    assert run_stage("02_baseline_ridge.py", ["--data", data, "--results", results, "--layers", "1", "--context-s", "4",
                                              "--stride-s", "2", "--delays", "1", "2"] + GRID) == 0
    assert len([f for f in os.listdir(results) if f.startswith("02_baseline_sim01")]) == 2
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt]) == 0
    out = plumbing.load_npz(one(f"{results}/04_cross_subject_*.npz"))
    r03 = plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
    np.testing.assert_allclose(out["mean_delta_r"][0, 0], np.mean(r03["test_r_tuned"] - r03["test_r_baseline"]), atol=1e-5)
    # the run's own stage 02 file changes under it in a way only the run's record of it can see
    # (same study, same base model: the model check of stage 04 passes)
    path = json.loads(str(r03["provenance"]))["baseline"]["file"]
    b = plumbing.load_npz(f"{results}/{path}")
    prov = json.loads(str(b["provenance"]))
    b["provenance"] = np.array(json.dumps(dict(prov, flags=prov["flags"] + ["--rerun"])))
    plumbing.save_npz(f"{results}/{path}", **b)
    fails_cleanly("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt], capsys,
                  "was scored against another stage 02 result", results)
    # now as if rerun with other model weights
    prov["model_fingerprint"] = "0" * 40
    b["provenance"] = np.array(json.dumps(prov))
    plumbing.save_npz(f"{results}/{path}", **b)
    fails_cleanly("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt], capsys,
                  "was scored against another stage 02 result", results)
    # and stage 03 asked to choose between two stage 02 results says so
    fails_cleanly("03_finetune_lora.py", ["--data", data, "--results", results, "--checkpoints", str(tmp_path / "c"),
                                          "--subject", "sim01"], capsys, "holds 2 stage 02 results for sim01", results)


@pytest.mark.parametrize("flags, msg", [
    (["--tuned-on", "UTS01"], "unknown subject(s) UTS01"),
    (["--roi", "V1"], "--roi 'V1': unknown ROI; choose one of whole, AC, LH, RH"),
    (["--tag", "xyz"], "--tag 'xyz'"),
    (["--seed", "7"], "no stage 03 result 03_sim01_whole_lora_seed7"),
    (["--full-finetune"], "no stage 03 result 03_sim01_whole_full_seed0"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
])
def test_cross_subject_bad_inputs(tuned, tmp_path, capsys, flags, msg):
    data, results, ckpt = _copy(tuned, tmp_path)
    fails_cleanly("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt] + flags, capsys,
                  msg, results)


def test_cross_subject_checks_every_run_before_any_scoring(tuned, tmp_path, capsys, monkeypatch):
    """Only sim01's run there: stage 04 fails before it scores anything, naming the command that
    makes sim02's run with the flags of the run it found, or --tuned-on for what exists."""
    data, results, ckpt = _copy(tuned, tmp_path)
    for f in os.listdir(results):
        if f.startswith("03_sim02_"):
            os.remove(os.path.join(results, f))
    scored = []
    monkeypatch.setattr(common, "score_on_test", lambda *a, **k: scored.append(1))
    err = fails_cleanly("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", ckpt], capsys,
                        "no stage 03 result 03_sim02_whole_lora_seed0*", results)
    sim01 = json.loads(str(plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))["provenance"]))
    assert f"python 03_finetune_lora.py --data {data} --results {results} --checkpoints {ckpt} --subject sim02" in err
    assert " ".join(sim01["flags"]) in err and "or pass --tuned-on sim01" in err and scored == []


def test_cross_subject_without_checkpoint(tuned, tmp_path, capsys):
    data, results, _ = _copy(tuned, tmp_path)
    fails_cleanly("04_cross_subject.py", ["--data", data, "--results", results, "--checkpoints", str(tmp_path)], capsys,
                  "has no checkpoint", results)


def test_probes(tuned, tmp_path, capsys):
    data, results, ckpt = _copy(tuned, tmp_path)
    assert run_stage("05_linear_probes.py", ["--data", data, "--results", results, "--checkpoints", ckpt,
                                             "--n-folds", "3"]) == 0
    printed = capsys.readouterr().out
    out = plumbing.load_npz(one(f"{results}/05_probes_*.npz"))
    assert list(out["models"]) == ["baseline", "whole", "AC"]
    assert list(out["probes"]) == ["semantic", "acoustic", "category"]
    assert out["scores"].shape == out["scores_sd_across_folds"].shape == (3, 4, 3)
    assert np.all(np.isfinite(out["scores_sd_across_folds"])) and out["scores_sd_across_folds"].max() > 0
    # each score on each fold of held-out stories, and the tuned models against the baseline fold by
    # fold at the tuned layer: the differences of the saved scores, not the groups' spreads
    by_fold = out["scores_by_fold"]
    assert by_fold.shape == (3, 4, 3, 3) and np.all(np.isfinite(by_fold))
    np.testing.assert_allclose(by_fold.std(-1), out["scores_sd_across_folds"], atol=1e-6)
    layer = int(plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))["layer"])
    for m, name in ((1, "whole"), (2, "AC")):
        d = by_fold[m, layer] - by_fold[0, layer]
        parts = [f"{p} {d[k].mean():+.3f} +- {d[k].std():.3f} (higher on {(d[k] > 0).sum()} of 3 folds)"
                 for k, p in enumerate(out["probes"])]
        assert f"{name} - baseline at layer {layer}, paired by held-out fold: " + ", ".join(parts) in printed, printed
    s = out["scores"]
    # acoustics are linearly there in every model; the words' meaning is too, above chance in some
    # layer (the semantic vectors are category centroids plus noise: the category is heard in the word)
    assert np.all(s[:, :, 1] > 0.3)
    assert np.all(s[:, :, 0].max(1) > 0.15)
    n_cat = len(plumbing.load_npz(f"{data}/truth.npz")["category_names"])
    assert np.all(s[:, :, 2].max(1) > 1.5 / n_cat) and np.all((s[:, :, 2] >= 0) & (s[:, :, 2] <= 1))
    assert os.path.exists(one(f"{results}/05_probes_*.png"))
    prov = json.loads(str(out["provenance"]))
    assert set(prov["runs"]) == {"whole", "AC"} and prov["stories"] == load_study(data)["stories_fingerprint"]


def test_the_semantic_probe_reads_each_word_s_own_meaning(tuned, tmp_path):
    """A control the probe must beat by a margin: the same representations, each word given its
    neighbour's meaning (the targets shifted by one word, computed here). Neighbouring words share a
    topic, so the control is well above zero: a stage 05 whose targets slipped by one word would
    score as the control does."""
    data, results, ckpt = _copy(tuned, tmp_path)
    assert run_stage("05_linear_probes.py", ["--data", data, "--results", results, "--checkpoints", ckpt,
                                             "--models", "baseline", "--n-folds", "3"]) == 0
    out = plumbing.load_npz(one(f"{results}/05_probes_*baseline*.npz"))
    aligned = out["scores"][0, :, list(out["probes"]).index("semantic")]
    study, truth = load_study(data), plumbing.load_npz(f"{data}/truth.npz")
    base = plumbing.load_npz(one(f"{results}/02_baseline_sim01_*.npz"))
    model = common.load_wavlm(str(base["model"]), int(base["model_seed"]))
    names = study["train"] + study["val"] + [study["test"]]
    reps, idx, groups = [], [], []
    index = {w: i for i, w in enumerate(truth["vocab"])}
    for g, s in enumerate(names):
        st = plumbing.load_npz(f"{data}/stories/{s}.npz")
        reps.append(common.word_representations(model, st, batching.story_cnn(model, st["audio"]),
                                                 float(base["context_s"]), float(base["stride_s"])))
        idx += [index[w] for w in st["words"]]
        groups += [g] * len(st["words"])
    reps, idx, groups = np.concatenate(reps, 1), np.array(idx), np.array(groups)
    content = truth["vocab_category"][idx] >= 0
    shifted = truth["semantic_vectors"][np.roll(idx, 1)][content]
    control = [common.probe(r[content], shifted, groups[content], 3) for r in reps]
    assert max(control) > 0.05  # the neighbour's meaning says something (a shared topic)
    assert aligned.max() > max(control) + MARGIN, (aligned, control)


def test_probe_recovers_a_linear_target_and_holds_out_whole_stories():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 20)).astype(np.float32)
    Y = X[:, :3] @ rng.standard_normal((3, 4)).astype(np.float32)
    groups = np.repeat(np.arange(6), 50)
    assert common.probe(X, Y, groups, 3) > 0.95
    assert abs(common.probe(X, rng.standard_normal((300, 4)).astype(np.float32), groups, 3)) < 0.1
    cls = (X[:, 0] > 0).astype(int)
    assert common.probe(X, np.eye(2, dtype=np.float32)[cls], groups, 3, cls) > 0.9
    folds = []  # the spread stage 05 plots: the score on each fold's held-out stories
    pooled = common.probe(X, np.eye(2, dtype=np.float32)[cls], groups, 3, cls, folds)
    held = [np.isin(groups, f) for f in np.array_split(np.arange(6), 3)]
    assert len(folds) == 3 and np.isclose(np.average(folds, weights=[h.sum() for h in held]), pooled)
    # rows of one story share a story-specific offset in both X and Y (as words of one story share
    # its topic): a probe that mixed rows of a story across folds would find it, one that holds out
    # whole stories cannot
    story_x = rng.standard_normal((12, 20)).astype(np.float32)
    story_y = rng.standard_normal((12, 4)).astype(np.float32)
    groups = np.repeat(np.arange(12), 25)
    X = story_x[groups] + 0.3 * rng.standard_normal((300, 20)).astype(np.float32)
    Y = story_y[groups] + 0.3 * rng.standard_normal((300, 4)).astype(np.float32)
    assert abs(common.probe(X, Y, groups, 4)) < 0.2
    assert common.probe(X, Y, rng.permutation(groups), 4) > 0.5  # shuffled "stories": the leak shows


def test_word_vectors_file(tmp_path):
    p = tmp_path / "glove.txt"
    p.write_text("dog 0.1 0.2 0.3\ncat 0.0 1.0 2.0\nthe 1 1 1\n")
    vecs = ds003020.read_word_vectors(str(p), {"dog", "cat", "zebra"})
    assert set(vecs) == {"dog", "cat"} and vecs["cat"][2] == 2.0
    with pytest.raises(plumbing.StudyError, match="not found"):
        ds003020.read_word_vectors(str(tmp_path / "none.txt"), {"dog"})
    p.write_text("dog 0.1 x 0.3\n")
    with pytest.raises(plumbing.StudyError, match="GloVe"):
        ds003020.read_word_vectors(str(p), {"dog"})


@pytest.mark.parametrize("flags, msg", [
    (["--models", "baseline", "V1"], "--models 'V1': unknown model; choose one of baseline, whole, AC"),
    (["--n-folds", "1"], "--n-folds 1 is out of range: it must be >= 2"),
    (["--subject", "UTS01"], "unknown subject(s) UTS01"),
    (["--seed", "4"], "no stage 03 result 03_sim01_whole_lora_seed4"),
    (["--word-vectors", "/nonexistent/glove.txt"], "--word-vectors /nonexistent/glove.txt not found"),
    (["--init-from", "whole"], "no stage 03 result 03_sim01_AC_lora_seed0* started from whole"),
])
def test_probes_bad_inputs(tuned, tmp_path, capsys, flags, msg):
    data, results, ckpt = _copy(tuned, tmp_path)
    fails_cleanly("05_linear_probes.py", ["--data", data, "--results", results, "--checkpoints", ckpt] + flags, capsys,
                  msg, results)


def test_probes_without_tuned_model(tuned, capsys, tmp_path):
    data, results, _ = _copy(tuned, tmp_path)
    fails_cleanly("05_linear_probes.py", ["--data", data, "--results", results, "--checkpoints", str(tmp_path)], capsys,
                  "has no checkpoint", results)


def test_a_checkpoint_swapped_behind_its_result_is_refused_by_stages_04_and_05(tuned, tmp_path, capsys):
    """Another run's checkpoint copied into sim01's whole-cortex folder (the result file is
    sim01's): stage 04 and stage 05 each refuse it in one line, before any scoring or probing."""
    data, results, ckpt = _copy(tuned, tmp_path)
    mine = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, mine)
    sim01 = os.path.basename(one(f"{mine}/03_sim01_whole_lora_seed0_*"))
    sim02 = os.path.basename(one(f"{mine}/03_sim02_whole_lora_seed0_*"))
    shutil.rmtree(os.path.join(mine, sim01, "best"))
    shutil.copytree(os.path.join(mine, sim02, "best"), os.path.join(mine, sim01, "best"))
    io = ["--data", data, "--results", results, "--checkpoints", mine]
    fails_cleanly("04_cross_subject.py", io, capsys, f"{mine}/{sim01}/best is not the checkpoint of", results)
    fails_cleanly("05_linear_probes.py", io + ["--models", "baseline", "whole"], capsys,
                  f"{mine}/{sim01}/best is not the checkpoint of", results)
