"""Test r: the untuned yardstick at a layer, and summaries per ROI and against the noise ceiling.

Used by stage 02 (its table and figure), stages 03 and 04 (a tuned model is compared with the
untuned model at its own layer: untuned_r) and bench/ (bench/tiny_model.py).
"""
import os

import numpy as np

import common
from lib import plumbing


def roi_masks(subject_data, n_voxels):
    """All voxels, plus AC and non-AC where the study has an AC mask."""
    masks = {"all": np.ones(n_voxels, bool)}
    if "roi_AC" in subject_data:
        masks["AC"], masks["non-AC"] = subject_data["roi_AC"], ~subject_data["roi_AC"]
    return masks


def roi_means(r, subject_data):
    return {k: float(np.mean(r[m])) if m.any() else np.nan for k, m in roi_masks(subject_data, len(r)).items()}


def frac_ceiling(r, ceiling):
    ok = np.isfinite(ceiling) & (ceiling > 0.1)  # ratios to a near-zero ceiling are meaningless
    return float(np.mean(r[ok]) / np.mean(ceiling[ok])) if ok.any() else np.nan


def untuned_r(base, layer, subject_data, study, args, device, memo):
    """The untuned model at `layer` on the subject of stage 02's result `base`, scored with that
    result's recipe: what a tuned model read out at `layer` is compared with, like for like. At the
    result's own layer it is the result's test r; at another, the base model's features come from
    stage 02's cache (plumbing.feature_cache_dir) and are scored here."""
    if layer == int(base["best_layer"]):
        return base["test_r"]
    if "model" not in memo:
        memo["model"] = common.load_wavlm(str(base["model"]), int(base["model_seed"]), device)
        memo["fingerprint"] = plumbing.model_fingerprint(memo["model"])
    cache = plumbing.feature_cache_dir(args.data, str(base["model"]), int(base["model_seed"]), float(base["context_s"]),
                                       float(base["stride_s"]))
    features = {s: common.story_features(memo["model"], memo["fingerprint"], cache,
                                         os.path.join(args.data, "stories", f"{s}.npz"), float(base["context_s"]),
                                         float(base["stride_s"]), data=args.data)[layer]
                for s in study["train"] + study["val"] + [study["test"]]}
    return common.score_on_test(features, subject_data, study, device=device, **common.ridge_recipe(base))[0]
