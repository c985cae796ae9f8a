"""claims.py: every verdict computed from the result files. A results folder written here
in the stages' layout, with every claim holding; then one result altered at a time so that its
claim fails, and its row turns to "does not hold" (and the other rows stay)."""
import json
import os

import numpy as np
import pytest

from helpers import run_stage
from lib import plumbing

V, AC = 40, np.arange(40) < 8  # 40 voxels, the first 8 in AC


def run(path, tuned, untuned, epochs=(5, 6), **extra):
    best, ran = epochs
    arrays = dict(test_r_tuned=np.float32(tuned), test_r_untuned=np.float32(untuned), init_from=np.array(""),
                  val_r_by_epoch=np.linspace(0, 1, ran), best_epoch=np.int64(best),
                  settings=np.array(json.dumps(dict(epochs=ran))))
    plumbing.save_npz(path, **dict(arrays, **extra))


def cross_subject(res, tuned_on, mean_delta_r, evaluated_on=("sim01", "sim02")):
    """Stage 04's result as it lays it out: a row per tuned model (single-subject runs, then any
    joint runs), a column per subject evaluated on."""
    plumbing.save_npz(os.path.join(res, "04_cross_subject_abcdef.npz"), tuned_on=np.array(tuned_on),
                      evaluated_on=np.array(evaluated_on), mean_delta_r=np.array(mean_delta_r))


@pytest.fixture
def folder(tmp_path):
    """Results where every claim holds: whole-cortex LoRA gains 0.01 everywhere but AC (-0.004),
    three seeds, steadier than full fine-tuning; AC tuning from it wins AC back and keeps 80%
    outside; every cross-subject gain positive; the semantic probe higher on 4 of 5 folds."""
    res, data = tmp_path / "results", tmp_path / "data"
    os.makedirs(res)
    os.makedirs(data / "subjects")
    plumbing.save_npz(data / "subjects" / "sim01.npz", roi_AC=AC)
    untuned = np.full(V, 0.1, np.float32)
    plumbing.save_npz(res / "02_baseline_sim01.npz", test_r=untuned)
    for seed, g in enumerate((0.010, 0.011, 0.012)):
        tuned = untuned + np.where(AC, -0.004, g)
        run(res / f"03_sim01_whole_lora_seed{seed}_abcdef.npz", tuned, untuned)
        run(res / f"03_sim01_whole_full_seed{seed}_abcdef.npz", untuned + [0.0, 0.03, 0.06][seed], untuned)
    whole = untuned + np.where(AC, -0.004, 0.010)
    run(res / "03_sim01_AC_lora_seed0_abcdef_from_sim01_whole_lora_seed0_abcdef.npz",
        untuned + np.where(AC, 0.02, 0.008), untuned, init_from=np.array("checkpoints/x/best"), test_r_start=whole)
    cross_subject(res, ["sim01", "sim02"], [[0.01, 0.004], [0.003, 0.012]])
    by_fold = np.zeros((2, 4, 1, 5))
    by_fold[1, 3, 0] = [0.02, 0.01, 0.015, -0.005, 0.01]  # whole - baseline at layer 3
    plumbing.save_npz(res / "05_probes_abcdef.npz", models=np.array(["baseline", "whole"]),
                      probes=np.array(["semantic"]), scores=by_fold.mean(-1), scores_by_fold=by_fold,
                      tuned_layer=np.int64(3))
    return str(res), str(data)


def verdicts(res, data, capsys):
    assert run_stage("claims.py", [res, "--data", data]) == 0
    rows = [line.split(" | ") for line in open(os.path.join(res, "claims.md")).read().splitlines()
            if line.startswith("| ") and "**" in line]
    return {r[0][2:].split(".")[0] + ("b" if "..." in r[0] or "AC tuning" in r[0] else ""): r[3].strip("*")
            for r in rows}


def test_every_claim_holds_on_results_that_show_it(folder, capsys):
    res, data = folder
    v = verdicts(res, data, capsys)
    assert v == {"1": "holds", "1b": "holds", "2": "holds", "2b": "holds", "3": "holds", "4": "holds"}, v
    text = open(os.path.join(res, "claims.md")).read()
    assert "+8%" in text and "AC over the whole-cortex run +0.0240" in text and "80%" in text


@pytest.mark.parametrize("alter, claim", [
    ("whole_seed1_loses", "1"), ("full_steadier", "1b"), ("ac_gains_under_whole", "2"),
    ("ac_run_keeps_little", "2b"), ("one_transfer_hurts", "3"), ("probe_lower", "4")])
def test_a_result_altered_so_that_a_claim_fails_turns_its_row(folder, capsys, alter, claim):
    res, data = folder
    untuned = np.full(V, 0.1, np.float32)
    if alter == "whole_seed1_loses":
        run(os.path.join(res, "03_sim01_whole_lora_seed1_abcdef.npz"), untuned - 0.001, untuned)
    elif alter == "full_steadier":
        for seed in range(3):
            run(os.path.join(res, f"03_sim01_whole_full_seed{seed}_abcdef.npz"), untuned + 0.03, untuned)
    elif alter == "ac_gains_under_whole":
        for seed in range(3):
            run(os.path.join(res, f"03_sim01_whole_lora_seed{seed}_abcdef.npz"), untuned + 0.01 + 0.001 * seed,
                untuned)
    elif alter == "ac_run_keeps_little":
        path = os.path.join(res, "03_sim01_AC_lora_seed0_abcdef_from_sim01_whole_lora_seed0_abcdef.npz")
        r = plumbing.load_npz(path)
        r["test_r_tuned"] = np.where(AC, r["test_r_tuned"], 0.102).astype(np.float32)  # keeps 20%
        plumbing.save_npz(path, **r)
    elif alter == "one_transfer_hurts":
        cross_subject(res, ["sim01", "sim02"], [[0.01, -0.001], [0.003, 0.012]])
    else:
        r = plumbing.load_npz(os.path.join(res, "05_probes_abcdef.npz"))
        r["scores_by_fold"][1, 3, 0] *= -1
        plumbing.save_npz(os.path.join(res, "05_probes_abcdef.npz"), **r)
    v = verdicts(res, data, capsys)
    assert v.pop(claim) == "does not hold", (claim, v)
    assert set(v.values()) == {"holds"}, v


def test_missing_runs_are_not_run_here_with_the_command(folder, capsys):
    res, data = folder
    for f in os.listdir(res):
        if "_full_" in f or "_from_" in f:
            os.remove(os.path.join(res, f))
    v = verdicts(res, data, capsys)
    assert v["1b"] == v["2b"] == "not run here"
    text = open(os.path.join(res, "claims.md")).read()
    assert "make stability" in text and "make 03" in text


def test_runs_still_improving_at_the_cap_are_said(folder, capsys):
    res, data = folder
    untuned = np.full(V, 0.1, np.float32)
    run(os.path.join(res, "03_sim01_whole_lora_seed2_abcdef.npz"), untuned + np.where(AC, -0.004, 0.012), untuned,
        epochs=(6, 6))
    verdicts(res, data, capsys)
    assert "1 of 7 runs had their best epoch at the cap (6 epochs)" in open(os.path.join(res, "claims.md")).read()


def test_each_recipes_claims_from_its_own_results_side_by_side(folder, capsys):
    """Runs of the authors' recipe (docs/methods.md) beside this repository's, in one folder: each
    recipe's claims come from its own results only (here every authors' result would fail its
    claim), the authors' table in claims_authors.md."""
    res, data = folder
    untuned = np.full(V, 0.1, np.float32)
    authors = dict(settings=np.array(json.dumps(dict(epochs=6, recipe="authors"))))
    plumbing.save_npz(os.path.join(res, "02_baseline_sim01_fedcba.npz"), test_r=untuned, recipe=np.array("authors"))
    for seed in range(3):
        run(os.path.join(res, f"03_sim01_whole_lora_seed{seed}_fedcba.npz"), untuned + 0.01 + 0.001 * seed,
            untuned, **authors)
    run(os.path.join(res, "03_sim01_AC_lora_seed0_fedcba_from_sim01_whole_lora_seed0_fedcba.npz"),
        untuned - 0.01, untuned, init_from=np.array("x/best"), test_r_start=untuned + 0.01, **authors)
    plumbing.save_npz(os.path.join(res, "04_cross_subject_fedcba.npz"), tuned_on=np.array(["sim01", "sim02"]),
                      evaluated_on=np.array(["sim01", "sim02"]), recipe=np.array("authors"),
                      mean_delta_r=np.array([[0.01, -0.004], [-0.003, 0.012]]))
    by_fold = np.zeros((2, 4, 1, 5))
    by_fold[1, 3, 0] = -0.01
    plumbing.save_npz(os.path.join(res, "05_probes_fedcba.npz"), models=np.array(["baseline", "whole"]),
                      probes=np.array(["semantic"]), scores=by_fold.mean(-1), scores_by_fold=by_fold,
                      tuned_layer=np.int64(3), recipe=np.array("authors"))
    v = verdicts(res, data, capsys)
    assert v == {"1": "holds", "1b": "holds", "2": "holds", "2b": "holds", "3": "holds", "4": "holds"}, v
    assert run_stage("claims.py", [res, "--data", data, "--recipe", "authors"]) == 0
    text = open(os.path.join(res, "claims_authors.md")).read()
    assert "3 LoRA and 0 full fine-tuning seed(s)" in text  # its own three seeds, none of the full runs
    for mine in ("AC change +0.0110 +- 0.0008", "AC over the whole-cortex run -0.0200",
                 "off-diagonal mean -0.0035", "whole - baseline at layer 3: -0.010"):
        assert mine in text, mine
    assert text.count("**does not hold**") == 4 and text.count("**holds**") == 1


def test_runs_of_other_settings_in_the_folder_are_not_counted_as_seeds(folder, capsys):
    """A folder that also holds sim01's runs of other settings (a flag tried on one or two seeds,
    tag 123456, and their stage 04 and 05 results): the claims read the settings with the most
    seeds (abcdef) and say so; --tag reads the others; a tie is refused, naming --tag."""
    res, data = folder
    untuned = np.full(V, 0.1, np.float32)
    other = untuned + np.where(AC, 0.03, -0.02)  # loses outside AC, gains in AC
    for seed in range(2):
        run(os.path.join(res, f"03_sim01_whole_lora_seed{seed}_123456.npz"), other, untuned)
    runs = np.array(["03_sim01_whole_lora_seed0_123456", "03_sim02_whole_lora_seed0_123456"])
    plumbing.save_npz(os.path.join(res, "04_cross_subject_123456.npz"), tuned_on=np.array(["sim01", "sim02"]),
                      evaluated_on=np.array(["sim01", "sim02"]), mean_delta_r=np.array([[0.01, -0.004], [-0.003, 0.012]]),
                      runs=runs)
    by_fold = np.full((2, 4, 1, 5), -0.01)
    by_fold[0] = 0
    plumbing.save_npz(os.path.join(res, "05_probes_123456_from_whole.npz"), models=np.array(["baseline", "whole"]),
                      probes=np.array(["semantic"]), scores=by_fold.mean(-1), scores_by_fold=by_fold,
                      tuned_layer=np.int64(3), runs=np.array(["", runs[0]]))
    v = verdicts(res, data, capsys)
    assert v == {"1": "holds", "1b": "holds", "2": "holds", "2b": "holds", "3": "holds", "4": "holds"}, v
    text = open(os.path.join(res, "claims.md")).read()
    assert "+0.0080 +- 0.0007 (+8% of the untuned 0.100), 3 seed(s)" in text
    assert "AC change -0.0040 +- 0.0000" in text and "tagged abcdef" in text and "--tag" in text
    assert run_stage("claims.py", [res, "--data", data, "--tag", "123456"]) == 0
    text = open(os.path.join(res, "claims.md")).read()
    assert "-0.0100 +- 0.0000 (-10% of the untuned 0.100), 2 seed(s)" in text and "AC change +0.0300" in text
    assert "off-diagonal mean -0.0035" in text and "whole - baseline at layer 3: -0.010" in text
    run(os.path.join(res, "03_sim01_whole_lora_seed2_123456.npz"), other, untuned)  # 3 seeds each: which?
    os.remove(os.path.join(res, "claims.md"))
    assert run_stage("claims.py", [res, "--data", data]) != 0
    err = capsys.readouterr().err
    assert "(tags 123456, abcdef)" in err and "--tag" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(res, "claims.md"))


def claim_3_row(res):
    return next(line for line in open(os.path.join(res, "claims.md")).read().splitlines() if line.startswith("| 3."))


@pytest.mark.parametrize("joint_gain", [-0.005, 0.02])
def test_claim_3_reads_the_single_subject_rows_of_a_stage_04_result_with_joint_rows(folder, capsys, joint_gain):
    """Stage 04 with joint runs adds a row per joint run (the joint run of both saw each subject;
    a leave-one-out run never saw one). Claim 3 is about models tuned on one subject: its verdict and
    its numbers come from those rows alone, whether the joint rows gain more or less."""
    res, data = folder
    joint = ["joint-sim01", "joint-sim02", "joint-sim01-sim02"]
    for single, verdict in [([[0.01, 0.004], [0.003, 0.012]], "holds"), ([[0.01, -0.001], [0.003, 0.012]], "does not hold")]:
        cross_subject(res, ["sim01", "sim02"] + joint, single + [[joint_gain] * 2] * len(joint))
        assert verdicts(res, data, capsys)["3"] == verdict, (single, joint_gain)
        off = np.array([single[0][1], single[1][0]])
        assert (f"off-diagonal mean {off.mean():+.4f} (min {off.min():+.4f}), diagonal {single[0][0]:+.4f} / "
                f"{single[1][1]:+.4f}") in claim_3_row(res), claim_3_row(res)


def test_claim_3_pairs_subjects_by_name_in_a_stage_04_result_of_a_subset(folder, capsys):
    """Stage 04 run for one tuned model on both subjects (--tuned-on sim02) writes a 1 x 2 matrix:
    its transfer is sim02's model on sim01 alone; sim02's model on sim02 is its diagonal, whatever
    its sign. On itself alone there is no transfer to judge: not run here."""
    res, data = folder
    for own in (0.01, -0.002):
        cross_subject(res, ["sim02"], [[0.004, own]])
        assert verdicts(res, data, capsys)["3"] == "holds", own
        assert f"off-diagonal mean +0.0040 (min +0.0040), diagonal {own:+.4f} |" in claim_3_row(res), claim_3_row(res)
    cross_subject(res, ["sim01", "joint-sim01-sim02"], [[0.01], [0.02]], evaluated_on=["sim01"])
    assert verdicts(res, data, capsys)["3"] == "not run here"
    assert "make 04" in claim_3_row(res)
