"""The claims table of bench/RESULTS.md from one results folder of bench/claims.sh.

    .venv/bin/python bench/claims_table.py RESULTS [--data DATA]

Gains are like for like: the tuned model's linearized test r minus the untuned model's at the same
layer (stage 03's test_r_untuned), mean over voxels; over seeds 0-2 as mean +- std (np.std).
"""
import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import plumbing, scoring  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("results")
p.add_argument("--data", default=None, help="the study's data folder (default: data_claims beside RESULTS)")
args = p.parse_args()
R = args.results


def runs(pattern):
    return [plumbing.load_npz(f) for f in sorted(glob.glob(os.path.join(R, pattern))) if "_from_" not in os.path.basename(f)
            or "_from_" in pattern]


def ms(x):
    return f"{np.mean(x):+.4f} +- {np.std(x):.4f}"


data = args.data or os.path.join(os.path.dirname(os.path.abspath(R)), "data_claims")
ac = plumbing.load_npz(os.path.join(data, "subjects", "sim01.npz"))["roi_AC"]
bases = {s: plumbing.load_npz(glob.glob(os.path.join(R, f"02_baseline_{s}*.npz"))[0]) for s in ("sim01", "sim02", "sim03")}
print("baseline mean test r:", " / ".join(f"{b['test_r'].mean():.3f}" for b in bases.values()),
      "| layer:", " / ".join(str(int(b["best_layer"])) for b in bases.values()),
      "| AC fraction of ceiling:", " / ".join(
          f"{scoring.frac_ceiling(b['test_r'][ac], b['noise_ceiling'][ac]):.2f}" for b in bases.values()))


def gains(rs):
    d = [r["test_r_tuned"] - r["test_r_untuned"] for r in rs]
    return [x.mean() for x in d], [x[ac].mean() for x in d], [x[~ac].mean() for x in d]


whole = runs("03_sim01_whole_lora_seed[012]_*.npz")
full = runs("03_sim01_whole_full_seed[012]_*.npz")
acr = runs("03_sim01_AC_lora_seed[012]_*.npz")
acw = runs("03_sim01_AC_lora_seed[012]_*_from_*.npz")
g, a, n = gains(whole)
base = bases["sim01"]["test_r"].mean()
print(f"1. whole-cortex LoRA gain {ms(g)} ({np.mean(g) / base:+.1%}); per seed {' / '.join(f'{x:+.4f}' for x in g)}")
gf, af, nf = gains(full)
print(f"1. full fine-tuning gain {ms(gf)} ({np.mean(gf) / base:+.1%}); AC {ms(af)}")
print(f"2. AC change under whole-cortex LoRA {ms(a)} (per seed {' / '.join(f'{x:+.4f}' for x in a)}); non-AC {ms(n)}")
_, a2, n2 = gains(acr)
print(f"2. AC tuning from the pretrained model: AC {ms(a2)} / non-AC {ms(n2)}")
if acw:
    over = [(r["test_r_tuned"] - w["test_r_tuned"])[ac].mean() for r, w in zip(acw, whole)]
    kept = [(r["test_r_tuned"] - r["test_r_untuned"])[~ac].mean() / w_n for r, w_n in zip(acw, n)]
    kept_text = (f"{np.mean(kept):.0%} ({', '.join(f'{k:.0%}' for k in kept)})" if np.mean(n) > 2 * np.std(n)
                 else "no gain to keep (the whole-cortex runs' non-AC gain is within its seed spread)")
    print(f"2. AC tuning from the whole-cortex model: AC over it {ms(over)}; non-AC gain kept {kept_text}")
cross = glob.glob(os.path.join(R, "04_cross_subject*.npz"))
if cross:
    c = plumbing.load_npz(cross[0])
    for key, what in (("mean_delta_r", "like for like"), ("mean_delta_r_vs_best", "against the best baseline")):
        m = c[key]
        off = m[~np.eye(len(m), dtype=bool)]
        print(f"3. cross-subject ({what}): diagonal {' / '.join(f'{x:+.4f}' for x in np.diag(m))}; off-diagonal mean "
              f"{off.mean():+.4f} (min {off.min():+.4f})")
probes = glob.glob(os.path.join(R, "05_probes*.npz"))
if probes:
    pr = plumbing.load_npz(probes[0])
    names, models = list(pr["probes"]), list(pr["models"])
    s = pr["scores"]
    print(f"4. semantic probe, best layer: baseline {s[models.index('baseline'), :, names.index('semantic')].max():.3f} "
          f"-> whole {s[models.index('whole'), :, names.index('semantic')].max():.3f}; acoustic: baseline "
          f"{s[models.index('baseline'), :, names.index('acoustic')].max():.3f} -> AC "
          f"{s[models.index('AC'), :, names.index('acoustic')].max():.3f}")
every = [plumbing.load_npz(f) for f in glob.glob(os.path.join(R, "03_*.npz"))]
last = [(int(r["best_epoch"]), len(r["val_r_by_epoch"])) for r in every]
print(f"runs whose best epoch was their last: {sum(b == e for b, e in last)} of {len(last)}; epochs run: "
      f"{sorted(e for _, e in last)}")
