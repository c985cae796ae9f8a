"""One model, several brains (beyond the paper): stage 03 --joint (one run, the same adapters and bottleneck,
an output layer per subject), stage 04's rows for joint runs, the subjects they never saw, and
the data-efficiency curves, on the tiny study."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import common
from helpers import as_a_fresh_process, ctrl_c_after_each_epoch, fails_cleanly, fresh_results, one, run_stage, stage
from lib import batching, checkpoints, plumbing

STAGE = "03_finetune_lora.py"
FAST = ["--epochs", "2", "--block-trs", "16", "--lr-adapter", "3e-3", "--lr-readout", "1e-3"]


@pytest.fixture(scope="module")
def joint(tiny_study, tmp_path_factory):
    """Baselines for both subjects; single-subject runs; joint runs of sim01 alone, of sim02 alone
    (the leave-one-out runs of a two-subject study) and of both."""
    base = tmp_path_factory.mktemp("joint")
    results, ckpt = str(base / "results"), str(base / "ckpt")
    io = ["--data", tiny_study, "--results", results, "--checkpoints", ckpt]
    assert run_stage("02_baseline_ridge.py", io[:4] + ["--layers", "1", "--context-s", "4", "--stride-s", "2"]) == 0
    assert run_stage(STAGE, io + FAST) == 0
    for subjects in (["sim01"], ["sim02"], ["sim01", "sim02"]):
        assert run_stage(STAGE, io + ["--subject", *subjects, "--joint"] + FAST) == 0
    return tiny_study, results, ckpt


def test_joint_tuning_on_one_subject_is_single_subject_tuning(joint):
    """The same seed, the same numbers: a joint run of one subject is that subject's run."""
    _, results, ckpt = joint
    single = plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
    alone = plumbing.load_npz(one(f"{results}/03_joint-sim01_whole_lora_seed0_*.npz"))
    assert list(alone["subjects"]) == ["sim01"] and str(alone["subject"]) == "joint-sim01"
    for k in ("test_r_tuned", "test_r_direct", "alphas_tuned", "test_r_untuned"):
        np.testing.assert_array_equal(alone[f"{k}_sim01"], single[k], err_msg=k)
    for k in ("val_r_by_epoch", "loss_by_epoch", "best_epoch", "layer"):
        np.testing.assert_array_equal(alone[k], single[k], err_msg=k)
    from safetensors.torch import load_file
    a = load_file(one(f"{ckpt}/03_joint-sim01_*/best/model/adapter_model.safetensors"))
    b = load_file(one(f"{ckpt}/03_sim01_whole_*/best/model/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_joint_run_scores_every_subject_it_saw_with_provenance(joint):
    data, results, _ = joint
    both = plumbing.load_npz(one(f"{results}/03_joint-sim01-sim02_whole_lora_seed0_*.npz"))
    prov = json.loads(str(both["provenance"]))
    assert prov["subjects"] == ["sim01", "sim02"] and set(prov["baselines"]) == {"sim01", "sim02"}
    assert set(prov["subject_data"]) == {"sim01", "sim02"}
    for s in ("sim01", "sim02"):
        base = plumbing.load_npz(one(f"{results}/02_baseline_{s}_*.npz"))
        assert both[f"test_r_tuned_{s}"].shape == base["test_r"].shape
        np.testing.assert_array_equal(both[f"test_r_untuned_{s}"], base["test_r"])  # the same layer
        assert os.path.exists(one(f"{results}/03_joint-sim01-sim02_whole_lora_seed0_*_{s}.png"))
    # the joint and the single runs are different models: their tuned scores differ
    single = plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
    assert not np.allclose(both["test_r_tuned_sim01"], single["test_r_tuned"])


def test_every_subjects_head_gets_a_gradient_from_one_forward():
    """The joint loss (the mean over subjects) trains the shared adapters and bottleneck and every
    subject's output layer; a subject's head gets no gradient from another subject's loss."""
    torch.manual_seed(0)
    readout = common.make_readout(12, {"a": 5, "b": 7}, 4)
    x = torch.randn(10, 12)
    preds = common.read_out(readout, x)
    ys = {"a": torch.randn(10, 5), "b": torch.randn(10, 7)}
    loss = sum(common.blocks_loss(preds[s], ys[s], [10]) for s in ys) / 2
    loss.backward()
    for name in ("bottleneck", "a", "b"):
        assert readout[name].weight.grad is not None and readout[name].weight.grad.abs().sum() > 0, name
    readout.zero_grad()
    common.blocks_loss(common.read_out(readout, x)["a"], ys["a"], [10]).backward()
    assert readout["b"].weight.grad is None or readout["b"].weight.grad.abs().sum() == 0


def test_a_joint_run_resumes_to_the_same_numbers(joint, tmp_path, monkeypatch, capsys):
    data, results, _ = joint
    res, ckpt = fresh_results(results, tmp_path, "joint")
    real = ctrl_c_after_each_epoch(monkeypatch)
    capsys.readouterr()
    io = ["--data", data, "--results", res, "--checkpoints", ckpt]
    assert run_stage(STAGE, io + ["--subject", "sim01", "sim02", "--joint"] + FAST) == 130
    hint = capsys.readouterr().err.split("`")[1].split()[2:]
    assert "--joint" in hint and "--resume" in hint
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    as_a_fresh_process(monkeypatch)
    assert run_stage(STAGE, hint) == 0
    a = plumbing.load_npz(one(f"{results}/03_joint-sim01-sim02_*.npz"))
    b = plumbing.load_npz(one(f"{res}/03_joint-sim01-sim02_*.npz"))
    np.testing.assert_allclose(b["val_r_by_epoch"], a["val_r_by_epoch"], atol=1e-6)
    np.testing.assert_allclose(b["test_r_tuned_sim02"], a["test_r_tuned_sim02"], atol=1e-5)


def test_subjects_who_heard_other_stories_are_one_line(joint, tmp_path, capsys):
    data, results, _ = joint
    mine = tmp_path / "data"
    shutil.copytree(data, mine, ignore=shutil.ignore_patterns("features"))
    d = plumbing.load_npz(mine / "subjects" / "sim02.npz")
    d["resp_story00"] = d["resp_story00"][:-1]  # one TR fewer: not the story sim01 heard
    plumbing.save_npz(mine / "subjects" / "sim02.npz", **d)
    fails_cleanly(STAGE, ["--data", str(mine), "--results", results, "--checkpoints", str(tmp_path / "c"),
                          "--subject", "sim01", "sim02", "--joint"] + FAST, capsys,
                  "--joint: the subjects did not hear the same stories (story00: sim01", str(tmp_path / "c"))


def test_stage_04_scores_joint_runs_like_for_like_and_on_the_subject_they_never_saw(joint, tmp_path):
    data, results, ckpt = joint
    out = str(tmp_path / "r")
    shutil.copytree(results, out)
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", out, "--checkpoints", ckpt,
                                             "--data-efficiency"]) == 0
    r = plumbing.load_npz(one(f"{out}/04_cross_subject_*.npz"))
    rows = list(r["tuned_on"])
    assert rows[:2] == ["sim01", "sim02"] and set(rows[2:]) == {"joint-sim01", "joint-sim02", "joint-sim01-sim02"}
    m = r["mean_delta_r"]
    # like for like: the joint run of both, on sim01, is its own stage 03 linearized score there
    both = plumbing.load_npz(one(f"{out}/03_joint-sim01-sim02_*.npz"))
    i = rows.index("joint-sim01-sim02")
    np.testing.assert_allclose(m[i, 0], np.mean(both["test_r_tuned_sim01"] - both["test_r_untuned_sim01"]),
                               atol=1e-5)
    # sim01 never seen by joint-sim02: own model, single models of others, the joint of others
    own, single, joint_ = r["unseen_sim01"]
    assert own == pytest.approx(m[0, 0]) and single == pytest.approx(m[1, 0])
    assert joint_ == pytest.approx(m[rows.index("joint-sim02"), 0])
    # the curves: one size per power of two up to every story, untuned with all at the end
    study = plumbing.load_npz(f"{data}/study.npz")
    n = len(study["train_stories"]) + len(study["val_stories"])
    assert list(r["efficiency_stories"]) == [1, 2, 4][:len(r["efficiency_stories"])] and r["efficiency_stories"][-1] == n
    base = plumbing.load_npz(one(f"{out}/02_baseline_sim01_*.npz"))
    assert r["efficiency_sim01_untuned"][-1] == pytest.approx(base["test_r"].mean(), abs=1e-6)
    assert os.path.exists(one(f"{out}/04_cross_subject_*_data_efficiency.png"))
    # each subject's curves come from the models that never saw it (never the joint run of both, nor
    # a joint run of it alone); each at every story is that model's cross-subject score; the stories
    # each needs are read off its curve against the untuned one's all-stories score
    for b, other in [("sim01", "sim02"), ("sim02", "sim01")]:
        kinds = {k[len(f"efficiency_{b}_"):] for k in r if k.startswith(f"efficiency_{b}_")}
        assert kinds == {"untuned", other, f"joint-{other}"}, (b, kinds)
        for kind in kinds - {"untuned"}:
            assert r[f"efficiency_{b}_{kind}"][-1] == pytest.approx(r[f"test_r_{kind}_on_{b}"].mean(), abs=1e-6)
        for kind in kinds:
            needed = stage("04_cross_subject.py").stories_to_match(
                r["efficiency_stories"], r[f"efficiency_{b}_{kind}"], r[f"efficiency_{b}_untuned"][-1])
            np.testing.assert_equal(r[f"stories_to_match_{b}_{kind}"], np.float32(needed))


def test_a_subject_no_joint_run_saw_is_scored_by_every_other_model_of_each_kind():
    """held_out on three subjects (the README's table): for each subject, its own model, the mean of
    the models tuned on each other subject, and the mean of the joint runs that never saw it (a
    leave-one-out run and any joint run of others), never a joint run that saw it. (The joint
    fixture's two subjects have one other model of each kind: there any of them is the mean.)"""
    m = stage("04_cross_subject.py")
    subjects = ["sim01", "sim02", "sim03"]
    tuned_on = subjects + ["joint-sim01-sim02-sim03", "joint-sim02-sim03", "joint-sim01-sim03", "joint-sim01-sim02",
                           "joint-sim03"]
    delta = np.random.default_rng(0).normal(0.01, 0.01, (len(tuned_on), len(subjects)))
    out = m.held_out(delta, tuned_on, subjects)
    assert set(out) == set(subjects)
    for j, b in enumerate(subjects):
        saw = [set(a.split("-")[1:]) if a.startswith("joint-") else {a} for a in tuned_on]
        single = [i for i, a in enumerate(tuned_on) if a in subjects and a != b]
        joint = [i for i, a in enumerate(tuned_on) if a.startswith("joint-") and b not in saw[i]]
        expected = (delta[j, j], delta[single, j].mean(), delta[joint, j].mean())
        np.testing.assert_allclose(out[b], expected, rtol=1e-12, err_msg=b)
        assert len(single) == 2 and len(joint) == (2 if b != "sim03" else 1)


def test_compare_leaves_joint_runs_to_stage_04(joint, capsys):
    """compare.py groups single-subject runs; a joint run beside them is not one of its groups."""
    _, results, _ = joint
    assert run_stage("compare.py", [results, "--out", os.path.join(results, "compare_joint.png")]) == 0
    assert "joint-" not in capsys.readouterr().out


def test_a_joint_step_of_stage_03_is_the_mean_of_each_subject_s_loss_and_moves_every_head(tiny_study, tmp_path,
                                                                                        monkeypatch):
    """Stage 03's own training function on two subjects, for an epoch of one step: the step's
    gradient is that of the mean over the subjects of each block's loss, each block forward on its
    own against the subject's responses at its rows (the step's three blocks, of 10, 5 and 10 TRs,
    come back regrouped from block_inputs); every subject's output layer and the bottleneck move
    from where the seed started them; the epoch's validation r is the mean over the subjects of
    each one's r on the validation story."""
    m = stage(STAGE)
    args = m.get_args(["--epochs", "1", "--block-trs", "10", "--batch-blocks", "3", "--lora-dropout", "0",
                       "--grad-clip", "1e9", "--bottleneck", "20", "--lr-adapter", "3e-3", "--lr-readout", "1e-3",
                       "--device", "cpu"])
    seed, layer, delays = 1, 2, (1, 2)
    d = {s: plumbing.load_npz(f"{tiny_study}/subjects/{s}.npz") for s in ("sim01", "sim02")}
    baseline = dict(model=np.array("tiny"), model_seed=np.int64(0), provenance=dict(stories="s"),
                    delays=np.array(delays))
    model, readout, opt, prov, _ = m.setup_model(args, baseline, seed, {s: len(d[s]["roi_AC"]) for s in d}, "cpu")
    for n, p in model.named_parameters():
        if "lora_B" in n:  # as after some training: lora_B starts at zero, which gives lora_A no gradient
            p.data.normal_(0, 0.1)
    start = {k: v.clone() for k, v in readout.state_dict().items()}
    stories = batching.load_stories(model, tiny_study, ["story00", "val00"], "cpu", 0.0, 4.0)
    resp = {s: {"story00": torch.tensor(d[s]["resp_story00"])} for s in d}  # blocks of 10, 10 and 5 TRs
    val_resp = {s: {"val00": d[s]["resp_val00"]} for s in d}
    params = [p for g in opt.param_groups for p in g["params"]]
    real_inputs, steps, checked = common.block_inputs, [], []

    def recorded(model_, stories_, blocks, *a, **k):
        x, order = real_inputs(model_, stories_, blocks, *a, **k)
        if torch.is_grad_enabled():  # a training step (validation runs without a gradient)
            steps.append((list(blocks), order))
        return x, order

    def each_block_on_its_own(optimizer, *_):
        loss = 0.0
        for s, i0, i1 in steps[-1][0]:
            x, _ = real_inputs(model, stories, [(s, i0, i1)], layer, delays)
            preds = common.read_out(readout, x)
            per_subject = [common.blocks_loss(preds[subj], resp[subj][s][i0:i1], [i1 - i0]) for subj in resp]
            loss = loss + torch.stack(per_subject).mean()
        expected = torch.autograd.grad(loss / args.batch_blocks, params, allow_unused=True)
        for p, g in zip(params, expected):
            if g is None:  # an adapter above the layer read out: the forward never reaches it
                assert p.grad is None or not p.grad.any()
            else:
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
        checked.append(len(steps))
    monkeypatch.setattr(common, "block_inputs", recorded)
    opt.register_step_pre_hook(each_block_on_its_own)
    run = dict(name="joint", ckpt=str(tmp_path / "ckpt"), prov=prov)
    history = m.train(args, run, model, readout, opt, stories, resp, val_resp, layer, seed, delays)
    assert checked == [1] and steps[0][1] != sorted(steps[0][1])  # regrouped (10, 5, 10): the case that can go wrong
    for name, before in start.items():
        assert not torch.equal(readout.state_dict()[name], before), f"{name} never moved from its start"
    with torch.no_grad():
        preds = common.predict_story(model, readout, stories["val00"], layer, args.block_trs, delays)
    val_r = np.mean([common.pearson_r(val_resp[s]["val00"], preds[s]).mean() for s in resp])
    assert history["val_r"] == [pytest.approx(val_r, abs=1e-6)]


def test_stories_needed_is_met_at_its_boundary_and_nan_when_never():
    """The stories a curve of test r needs to reach a target: the untuned curve reaches its own
    all-stories score exactly at its last size (the boundary: >=, not >); a size whose score equals
    the target is that size; between sizes, linear (np.interp on a rising curve); a target above
    the whole curve is never reached (NaN, not the largest size); below the first, the first size;
    a curve that dips after reaching it is counted at its first crossing."""
    m = stage("04_cross_subject.py")
    sizes = [1, 2, 4, 8, 13]
    curve = np.array([0.011, 0.017, 0.026, 0.031, 0.034])
    assert m.stories_to_match(sizes, curve, curve[-1]) == 13.0
    for k in range(len(sizes)):
        assert m.stories_to_match(sizes, curve, curve[k]) == pytest.approx(sizes[k], abs=1e-9), k
    for target in np.linspace(curve[0], curve[-1], 17):
        assert m.stories_to_match(sizes, curve, target) == pytest.approx(np.interp(target, curve, sizes)), target
    assert np.isnan(m.stories_to_match(sizes, curve, curve[-1] + 1e-4))
    assert m.stories_to_match(sizes, curve, curve[0] - 0.01) == 1.0
    dips = np.array([0.011, 0.030, 0.020, 0.031, 0.034])
    assert m.stories_to_match(sizes, dips, 0.025) == pytest.approx(np.interp(0.025, dips[:2], sizes[:2]))
