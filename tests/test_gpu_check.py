"""bench/gpu_check.sh, the prepared GPU check, end to end on CPU at a tiny size: ready the first
time a GPU is lent."""
import json
import os
import subprocess
import sys

from helpers import ROOT, one


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--size", "tiny", "--steps", "2",
                           "--out", str(tmp_path), "--skip-compile"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.load(open(tmp_path / "gpu_check.json"))
    assert out["device"] == "cpu" and out["tests_rc"] == 0  # the CUDA tests skip here, without failing
    assert out["stage02_rc"] == out["stage03_rc"] == out["stage05_rc"] == 0
    for rate in ("features_audio_s_per_s", "train_steps_per_s", "stage05_audio_s_per_s"):
        assert out[rate] > 0 and out[rate + "_before" if "05" not in rate else rate] > 0, rate
    assert out["ridge_s"] > 0 and out["ridge_shape"] == [2000, 256, 3000]
    # two blocks (~8,400 frames) through the tiny model's first layer and back: a forward pass is
    # about 0.2 MFLOP per frame, so a few GFLOP per step, not a few MFLOP (nothing counted) or TFLOP;
    # the step before the batched step (1a7be3b) did the same work (its CNN was the story's, sliced, for this model)
    for tag in ("", "_before"):
        assert 1e9 < out["train_flops_per_step" + tag] < 2e10
    assert abs(out["train_flops_per_step"] / out["train_flops_per_step_before"] - 1) < 0.1
    assert os.path.exists(one(f"{tmp_path}/results/03_sim01_whole_lora_seed0_*.npz"))
