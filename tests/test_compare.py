"""compare.py: groups runs by settings and seeds, and says when a difference is within the spread."""
import json

import numpy as np

from lib import plumbing
from helpers import fails_cleanly, run_stage


def fake_run(folder, seed, gain, tag="", settings=None, stories="s1", roi="whole", init_from=None, code=None,
             tuned=None, n=50, subject_data="x"):
    """A stage 03 result with a known gain (every voxel changes by `gain`, or tuned r = `tuned`)."""
    base = np.linspace(0.0, 0.5, n).astype(np.float32)
    settings = dict({"loss": "corr", "epochs": 7}, **(settings or {}))
    prov = dict(stage="03", subject="sim01", roi=roi, seed=seed, tag=tag, settings=settings, mode="lora",
                stories=stories, subject_data=subject_data, init_from=dict(name=init_from, fingerprint="f") if init_from else None,
                baseline=dict(file="02_baseline_sim01.npz", tag="", fingerprint="b"), code=code,
                flags=[f"--{k} {v}" for k, v in (settings or {}).items()])
    name = f"03_sim01_{roi}_lora_seed{seed}{'_' + tag if tag else ''}" + (f"_from_{init_from[3:]}" if init_from else "")
    plumbing.save_npz(f"{folder}/{name}.npz", test_r_baseline=base, test_r_untuned=base,
                      test_r_tuned=base + gain if tuned is None else tuned,
                      val_r_by_epoch=np.array([0.1, 0.2, 0.15], np.float32), best_epoch=np.int64(2),
                      provenance=np.array(json.dumps(prov)))
    return name, base + gain if tuned is None else tuned


def verdicts(out):
    return {line.split("]: ")[0]: line for line in out.splitlines() if " against [" in line}


def test_compare_knows_the_seed_spread(tmp_path, capsys):
    ref, mine = tmp_path / "ref" / "results", tmp_path / "mine" / "results"
    for seed, gain in enumerate([0.010, 0.012, 0.014]):  # std 0.0016
        fake_run(ref, seed, gain)
    fake_run(mine, 0, 0.011, tag="aaaaaa", settings={"loss": "mse"})  # one seed: no verdict
    for seed, gain in enumerate([0.0125, 0.0145, 0.0165]):  # +0.0025, 1.5 sd: still within 2 sd
        fake_run(mine, seed, gain, tag="eeeeee", settings={"norm": "none"})
    fake_run(mine, 0, 0.030, tag="bbbbbb", settings={"epochs": 20})   # far outside it
    fake_run(mine, 1, 0.031, tag="bbbbbb", settings={"epochs": 20})
    assert run_stage("compare.py", [str(ref), str(mine)]) == 0
    out = capsys.readouterr().out
    lines = verdicts(out)
    single = next(v for k, v in lines.items() if "[aaaaaa]" in k)
    assert "loss corr -> mse" in single and "paired by seed 0: gain +0.0110 vs +0.0100, difference +0.0010" in single
    assert "one seed on one side: the seed spread is unknown (the reference's sd is 0.0016), so no verdict" in single
    between = next(v for k, v in lines.items() if "[eeeeee]" in k)
    assert "norm None -> none" in between and "paired by seeds 0 1 2: mean difference +0.0025" in between
    assert "+0.0025: within the seed spread (2 x sd 0.0016)" in between
    beyond = next(v for k, v in lines.items() if "[bbbbbb]" in k)
    assert "epochs 7 -> 20" in beyond and "+0.0185: beyond the seed spread (2 x sd 0.0016)" in beyond
    assert "the best epoch was the last" not in out and (ref / "compare.png").exists()
    # one seed on both sides: no verdict
    single = tmp_path / "single"
    fake_run(single, 0, 0.02, tag="cccccc", settings={"loss": "mse"})
    assert run_stage("compare.py", [str(mine / "03_sim01_whole_lora_seed0_aaaaaa.npz"), str(single)]) == 0
    assert "one seed on each side: the seed spread is unknown, so no verdict" in capsys.readouterr().out
    # another study is flagged, not compared silently
    other = tmp_path / "other"
    fake_run(other, 0, 0.02, tag="dddddd", settings={"loss": "mse"}, stories="another")
    assert run_stage("compare.py", [str(ref), str(other)]) == 0
    assert "against [default]: ANOTHER STUDY (its stories or sim01's responses differ)" in capsys.readouterr().out
    fails_cleanly("compare.py", [str(tmp_path / "empty")], capsys, "no stage 03 results")


def test_compare_pairs_seeds_and_names_edited_code(tmp_path, capsys):
    """Seed 2 of an edit that changes nothing equals the reference's seed 2: paired, the difference is
    0, where against the reference's 3-seed mean it would read +0.0020. Edited code is a change."""
    ref, mine = tmp_path / "ref" / "results", tmp_path / "mine" / "results"
    code = dict(fingerprint="a", files={"03_finetune_lora.py": "1", "common.py": "2"}, commit="c", edited=[])
    for seed, gain in enumerate([0.010, 0.012, 0.014]):
        fake_run(ref, seed, gain, code=code)
    edited = dict(code, fingerprint="b", files={"03_finetune_lora.py": "9", "common.py": "2"},
                  edited=["03_finetune_lora.py"])
    fake_run(mine, 2, 0.014, tag="ffffff", code=edited)
    assert run_stage("compare.py", [str(ref), str(mine)]) == 0
    line = next(v for k, v in verdicts(capsys.readouterr().out).items() if "[ffffff]" in k)
    assert "changes code differs (files 03_finetune_lora.py)" in line
    assert "paired by seed 2: gain +0.0140 vs +0.0140, difference +0.0000" in line


def test_a_run_started_from_another_is_measured_against_it(tmp_path, capsys):
    """AC tuning from the whole-cortex run (the paper's claim 2): its change over the very run it
    started from, in AC and outside, and the share of that run's gain it keeps outside AC."""
    res = tmp_path / "demo" / "results"
    ac = np.zeros(50, bool)
    ac[:10] = True
    plumbing.save_npz(tmp_path / "demo" / "data" / "subjects" / "sim01.npz", roi_AC=ac)
    plumbing.save_npz(tmp_path / "demo" / "data" / "study.npz", subjects=np.array(["sim01"]),
                      subject_fingerprints=np.array(["x"]))
    for seed, gain in enumerate([0.010, 0.014]):
        start, tuned = fake_run(res, seed, gain)
        fake_run(res, seed, 0, roi="AC", init_from=start, tuned=tuned + np.where(ac, 0.02 + 0.002 * seed, -0.005))
    assert run_stage("compare.py", [str(res)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("sim01 AC lora from whole [default] over"))
    assert ("over the run each started from (2 seeds, paired): AC +0.0210 +- 0.0010, outside AC -0.0050 +- 0.0000; "
            "outside AC it keeps 58% of that run's gain (+0.0070 against +0.0120)") in line
    assert "sim01 whole lora [default]: the reference for its kind" in out


def test_two_studies_of_other_sizes_each_find_their_own_ac_mask(tmp_path, capsys):
    """Exercise 1 compares the abstract study (results_abstract/, data_abstract/: the same stories,
    other subjects) with the demo's: each run's AC mask comes from its own study's data folder (by
    the subject's fingerprint), and runs of two studies get no verdict (this crashed on the sizes)."""
    for folder, n, subject_data in (("results_abstract", 30, "abs"), ("results", 50, "s1")):
        ac = np.arange(n) < 10
        data = tmp_path / folder.replace("results", "data")
        plumbing.save_npz(data / "subjects" / "sim01.npz", roi_AC=ac)
        plumbing.save_npz(data / "study.npz", subjects=np.array(["sim01"]), subject_fingerprints=np.array([subject_data]))
        for seed in (0, 1):
            fake_run(tmp_path / folder, seed, 0, n=n, subject_data=subject_data,
                     tuned=np.linspace(0.0, 0.5, n).astype(np.float32) + np.where(ac, 0.02, 0.01))
    assert run_stage("compare.py", [str(tmp_path / "results_abstract"), str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    rows = [x for x in out.splitlines() if x.startswith("sim01 whole lora  ")]
    assert len(rows) == 2 and all("+0.0200  +0.0100" in x for x in rows), rows  # AC, outside AC: each its own
    assert "ANOTHER STUDY (its stories or sim01's responses differ): not comparable, no verdict" in out


def test_compare_ignores_an_ac_mask_of_another_study(tmp_path, capsys, monkeypatch):
    """compare.py looks for the AC mask in data/ beside the results (and in ./data): a mask of
    another size (make demo's data/, when the runs come from elsewhere) is no AC split, not a crash."""
    monkeypatch.chdir(tmp_path)
    plumbing.save_npz(tmp_path / "data" / "subjects" / "sim01.npz", roi_AC=np.zeros(12000, bool))
    runs = tmp_path / "elsewhere" / "results"
    for seed in (0, 1):
        fake_run(runs, seed, 0.01)
    assert run_stage("compare.py", [str(runs)]) == 0
    assert "whole lora" in capsys.readouterr().out

