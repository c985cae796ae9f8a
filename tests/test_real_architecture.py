"""The real model's code path on CPU: wavlm-base-plus's architecture, 2 layers, through stages 02-05.

transformers' WavLMConfig() defaults are wavlm-base-plus's shape: 768 hidden, 12 heads, a group-norm
CNN of 512 channels without conv biases. A random model of that shape with 2 layers is saved with
save_pretrained and passed as `--model <folder>`, so the stages go through the same from_pretrained
path and the same per-window CNN (group norm normalises over its input) a real user gets. Short
audio and 2 s windows without extra context keep it quick; the architecture is not shrunk. Stage 05
probes the tuned model only: the frozen one loads as in stages 02-03, and each probe costs a pass of
the 512-channel CNN over every story (5 s here).
"""
import json
import os

import numpy as np
import pytest
import torch

import common
from lib import batching, plumbing
from helpers import one, run_stage

STUDY = ["--cortex", "none", "--n-subjects", "1", "--n-voxels", "40", "--n-train-stories", "2", "--n-val-stories", "1",
         "--story-seconds", "32", "--test-seconds", "32", "--seed", "5"]


@pytest.fixture(scope="module")
def real_arch(tmp_path_factory):
    from transformers import WavLMConfig, WavLMModel
    root = tmp_path_factory.mktemp("realarch")
    cfg = WavLMConfig(num_hidden_layers=2)
    assert (cfg.hidden_size, cfg.conv_dim[0], cfg.feat_extract_norm, cfg.conv_bias) == (768, 512, "group", False)
    torch.manual_seed(0)
    WavLMModel(cfg).save_pretrained(root / "wavlm-base-plus-2layers")
    data, results, ckpt = str(root / "data"), str(root / "results"), str(root / "ckpt")
    assert run_stage("01_prepare_data.py", ["--data", data] + STUDY) == 0
    return str(root / "wavlm-base-plus-2layers"), data, results, ckpt


def test_real_architecture_runs_stages_02_to_05(real_arch):
    folder, data, results, ckpt = real_arch
    io = ["--data", data, "--results", results]
    assert run_stage("02_baseline_ridge.py", io + ["--model", folder, "--context-s", "0", "--stride-s", "2"]) == 0
    base = plumbing.load_npz(one(f"{results}/02_baseline_sim01_*.npz"))
    assert str(base["model"]) == folder and base["val_r_by_layer"].shape == (3, 40)
    # the feature cache is keyed to the folder's weights
    model = common.load_wavlm(folder)
    assert batching.story_cnn(model, np.zeros(16000, np.float32)) is None  # group norm: the CNN runs per window
    cache = plumbing.feature_cache_dir(data, folder, 0, 0.0, 2.0)
    key = json.loads(str(plumbing.load_npz(f"{cache}/test.npz")["key"]))
    assert key["model"] == plumbing.model_fingerprint(model)

    assert run_stage("03_finetune_lora.py", io + ["--checkpoints", ckpt, "--epochs", "1",
                                                  "--train-stride-s", "2"]) == 0
    from safetensors.torch import load_file
    adapters = load_file(one(f"{ckpt}/03_sim01_whole_lora_seed0_*") + "/best/model/adapter_model.safetensors")
    lora_b = {k: v for k, v in adapters.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 3  # q, k, v of each of the 2 layers: the paper's targets
    assert all(v.abs().sum() > 0 for v in lora_b.values())  # every adapter trained
    run = plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
    assert np.isfinite(run["test_r_tuned"]).all()

    assert run_stage("04_cross_subject.py", io + ["--checkpoints", ckpt]) == 0
    assert plumbing.load_npz(one(f"{results}/04_cross_subject_*.npz"))["mean_delta_r"].shape == (1, 1)
    assert run_stage("05_linear_probes.py", io + ["--checkpoints", ckpt, "--models", "whole"]) == 0
    assert os.path.exists(one(f"{results}/05_probes_*.npz"))
