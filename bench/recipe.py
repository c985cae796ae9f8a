"""Stage 02's recipe for bench scripts that bring their own features (bench/features.py,
bench/tiny_model.py): the layer with the best mean validation r, refit on train + validation, Pearson
r on the test story. The same calls as 02_baseline_ridge.fit_and_score without --sweep-voxels, at
stage 02's default delays, alphas and folds."""
import numpy as np

import common
from lib.study import stack_responses


def best_layer_score(ds, subject_data, study, layers, device="cpu"):
    """ds[story]: (layers x (PAD_TRS + TRs) x features). Returns (test r per voxel, the best layer)."""
    def design(stories, layer):
        return np.vstack([common.design_matrix(ds[s][layer]) for s in stories])
    Y_train = stack_responses(subject_data, study["train"])
    Y_val = stack_responses(subject_data, study["val"])
    val_r = []
    for layer in layers:
        W, _, _ = common.ridge_cv(design(study["train"], layer), Y_train, device=device)
        val_r.append(common.pearson_r(Y_val, common.ridge_predict(design(study["val"], layer), W, device)).mean())
    best = layers[int(np.argmax(val_r))]
    test_r, _, _ = common.score_on_test({s: ds[s][best] for s in ds}, subject_data, study, device=device)
    return test_r, best
