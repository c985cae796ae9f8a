"""compare.py: groups runs by settings and seeds, and says when a difference is within the spread."""
import json

import numpy as np

from lib import plumbing
from conftest import fails_cleanly, run_stage


def fake_run(folder, seed, gain, tag="", settings=None, stories="s1"):
    """A stage 03 result with a known gain (every voxel changes by `gain`)."""
    base = np.linspace(0.0, 0.5, 50).astype(np.float32)
    settings = dict({"loss": "corr", "epochs": 7}, **(settings or {}))
    prov = dict(stage="03", subject="sim01", roi="whole", mode="lora", seed=seed, tag=tag, settings=settings,
                stories=stories, subject_data="x", init_from=None,
                baseline=dict(file="02_baseline_sim01.npz", tag="", fingerprint="b"))
    name = f"03_sim01_whole_lora_seed{seed}{'_' + tag if tag else ''}"
    plumbing.save_npz(f"{folder}/{name}.npz", test_r_baseline=base, test_r_tuned=base + gain,
                    val_r_by_epoch=np.array([0.1, 0.2, 0.15], np.float32), best_epoch=np.int64(2),
                    provenance=np.array(json.dumps(prov)))


def test_compare_knows_the_seed_spread(tmp_path, capsys):
    ref, mine = tmp_path / "ref" / "results", tmp_path / "mine" / "results"
    for seed, gain in enumerate([0.010, 0.012, 0.014]):  # std 0.0016
        fake_run(ref, seed, gain)
    fake_run(mine, 0, 0.011, tag="aaaaaa", settings={"loss": "mse"})  # inside the spread
    fake_run(mine, 0, 0.0145, tag="eeeeee", settings={"norm": "none"})  # 1.5 sd away: still within 2 sd
    fake_run(mine, 0, 0.030, tag="bbbbbb", settings={"epochs": 20})   # far outside it
    fake_run(mine, 1, 0.031, tag="bbbbbb", settings={"epochs": 20})
    assert run_stage("compare.py", [str(ref), str(mine)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("]: ")[0]: line for line in out.splitlines() if "against" in line}
    within = next(v for k, v in lines.items() if "[aaaaaa]" in k)
    beyond = next(v for k, v in lines.items() if "[bbbbbb]" in k)
    assert "loss corr -> mse" in within and "-0.0010: within the seed spread (2 x sd 0.0016)" in within
    between = next(v for k, v in lines.items() if "[eeeeee]" in k)
    assert "norm None -> none" in between and "+0.0025: within the seed spread (2 x sd 0.0016)" in between
    assert "epochs 7 -> 20" in beyond and "+0.0185: beyond the seed spread (2 x sd 0.0016)" in beyond
    assert "the best epoch was the last" not in out and (ref / "compare.png").exists()
    # one seed on both sides: no verdict
    single = tmp_path / "single"
    fake_run(single, 0, 0.02, tag="cccccc", settings={"loss": "mse"})
    assert run_stage("compare.py", [str(mine / "03_sim01_whole_lora_seed0_aaaaaa.npz"), str(single)]) == 0
    assert "one seed on each side, the seed spread is unknown" in capsys.readouterr().out
    # another study is flagged, not compared silently
    other = tmp_path / "other"
    fake_run(other, 0, 0.02, tag="dddddd", settings={"loss": "mse"}, stories="another")
    assert run_stage("compare.py", [str(ref), str(other)]) == 0
    assert "ANOTHER STUDY: not comparable" in capsys.readouterr().out
    fails_cleanly("compare.py", [str(tmp_path / "empty")], capsys, "no stage 03 results")


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

