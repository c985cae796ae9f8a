"""How stable is stage 02's layer choice for subjects built from the same kind of truth?

For each simulation seed, stage 01 builds the default study (3 subjects on S1's cortex, two
validation stories). For every layer, ridge with stage 02's recipe (common.ridge_cv, the default
delays, alphas and folds) is fit on the training stories and scored on each validation story.
Printed, for one validation story (the first) and for both: each subject's own pick (stage 02's
--layer-choice subject), the study-wide pick (--layer-choice study, the default: the best mean over
the subjects of each subject's mean validation r), how often the three subjects agree, and how often
each choice equals the most common one across seeds.

    .venv/bin/python bench/layer_choice.py --seeds 0 1 2 3 [--work layer_choice_work]
"""
import argparse
import collections
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from lib import plumbing  # noqa: E402
from lib.study import load_study, load_subject, stack_responses  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
p.add_argument("--model", default="tiny-pretrained")
p.add_argument("--work", default="layer_choice_work", help="scratch folder for the studies")
args = p.parse_args()
plumbing.set_threads()

picks = collections.defaultdict(list)  # (n validation stories) -> [(own picks, study pick)]
for seed in args.seeds:
    data = os.path.join(args.work, f"data_seed{seed}")
    if not os.path.exists(os.path.join(data, "study.npz")):
        subprocess.run([sys.executable, "01_prepare_data.py", "--data", data, "--seed", str(seed)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
    study = load_study(data)
    model = common.load_wavlm(args.model)
    fp = plumbing.model_fingerprint(model)
    cache = plumbing.feature_cache_dir(data, args.model, 0, 16.0, 4.0)
    feats = {s: common.story_features(model, fp, cache, os.path.join(data, "stories", f"{s}.npz"), 16.0, 4.0, data=data)
             for s in study["train"] + study["val"]}
    layers = range(len(feats[study["train"][0]]))
    val_r = {}  # subject -> layers x validation stories (mean r over voxels)
    for subj in study["subjects"]:
        d = load_subject(data, subj, study)
        Y = stack_responses(d, study["train"])
        rows = []
        for layer in layers:
            W, _, _ = common.ridge_cv(np.vstack([common.design_matrix(feats[s][layer]) for s in study["train"]]), Y)
            rows.append([common.pearson_r(d[f"resp_{v}"], common.ridge_predict(common.design_matrix(feats[v][layer]), W)).mean()
                         for v in study["val"]])
        val_r[subj] = np.array(rows)
    for n_val in (1, 2):
        per = {s: v[:, :n_val].mean(1) for s, v in val_r.items()}
        own = {s: int(np.argmax(v)) for s, v in per.items()}
        picks[n_val].append((own, int(np.argmax(np.mean(list(per.values()), axis=0)))))
        print(f"seed {seed}, {n_val} validation stor{'y' if n_val == 1 else 'ies'}: own layers {own}, study-wide "
              f"{picks[n_val][-1][1]}; mean validation r by layer " + "; ".join(
                  f"{s} {np.round(v, 4).tolist()}" for s, v in per.items()), flush=True)

print()
for n_val, rows in picks.items():
    owns = [layer for own, _ in rows for layer in own.values()]
    studies = [study for _, study in rows]
    common_own = collections.Counter(owns).most_common(1)[0]
    common_study = collections.Counter(studies).most_common(1)[0]
    agree = sum(len(set(own.values())) == 1 for own, _ in rows)
    print(f"{n_val} validation stor{'y' if n_val == 1 else 'ies'}: the 3 subjects agree in {agree} of {len(rows)} seeds; "
          f"own picks {dict(sorted(collections.Counter(owns).items()))} (layer {common_own[0]} in {common_own[1]} of "
          f"{len(owns)}); study-wide picks {dict(sorted(collections.Counter(studies).items()))} (layer "
          f"{common_study[0]} in {common_study[1]} of {len(studies)})")
