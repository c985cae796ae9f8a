"""Summaries of test r: per ROI (all, AC, non-AC) and as a fraction of the noise ceiling.

Used by stage 02 (its table), lib/figures.py and bench/ (claims_table.py,
tiny_model.py). The yardstick of the tuned models, the untuned model at the same layer, is
common.untuned_r.
"""
import numpy as np


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
