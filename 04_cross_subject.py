"""Stage 04: do brain-tuned models generalise across subjects?

The paper's cross-subject analysis (Section 3.3): a WavLM fine-tuned on subject A's responses
(stage 03) gives features; stage 02's exact ridge recipe maps them to subject B's voxels (fit on
B's train + validation stories, scored on B's test story). The gain over B's own baseline says
whether what the model learned from A is a property of the speech, not of A's brain.

    python 04_cross_subject.py                  # every subject's whole-cortex LoRA model, on everyone
    python 04_cross_subject.py --roi AC --tuned-on sim01

Reads results/02_baseline_<subject>.npz, results/03_<subject>_<roi>_<mode>_seed<N>.npz and the tuned
features stage 03 cached under data/features/03_.../ (recomputed from the checkpoint if absent).
"""
import argparse
import os
import time

import numpy as np

import common
from common import StudyError


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="stage 03's checkpoint folder")
    p.add_argument("--tuned-on", nargs="+", help="subjects whose tuned models to use (default: all)")
    p.add_argument("--evaluate-on", nargs="+", help="subjects to evaluate on (default: all)")
    p.add_argument("--roi", default="whole", help="which stage 03 runs: whole|AC|LH|RH")
    p.add_argument("--full-finetune", action="store_true", help="use the full fine-tuning runs")
    p.add_argument("--seed", type=int, default=0, help="which stage 03 seed")
    p.add_argument("--init-from", help="use the runs stage 03 started from this run (its name without "
                   "'03_', e.g. sim01_whole_lora_seed0)")
    return p.parse_args(argv)


def load_tuned(args, subj, device):
    """The best epoch of a stage 03 run: (model, layer, run name, the 02 baseline it started from)."""
    mode = "full" if args.full_finetune else "lora"
    name = common.run_name(subj, args.roi, mode, args.seed, args.init_from)
    res_path = os.path.join(args.results, f"{name}.npz")
    best = os.path.join(args.checkpoints, name, "best", "model")
    if not os.path.exists(res_path) or not os.path.isdir(best):
        raise StudyError(f"no tuned model {name} ({res_path} or {best} missing): run "
                         f"`python 03_finetune_lora.py --subject {subj} --roi {args.roi} --seed {args.seed}"
                         f"{' --full-finetune' if args.full_finetune else ''}"
                         f"{f' --init-from {args.checkpoints}/03_{args.init_from}' if args.init_from else ''}` first")
    run = common.load_npz(res_path)
    base = common.load_npz(os.path.join(args.results, f"02_baseline_{subj}.npz"), "stage 02 result")
    model = common.load_tuned_wavlm(base, best, args.full_finetune, device)
    return model.eval(), int(run["layer"]), name, base


def plot(mean_delta, tuned_on, evaluated_on, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.3 * len(evaluated_on) + 2.5, 1.1 * len(tuned_on) + 1.8))
    lim = np.nanmax(np.abs(mean_delta)) or 1
    im = ax.imshow(mean_delta, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(len(tuned_on)):
        for j in range(len(evaluated_on)):
            ax.text(j, i, f"{mean_delta[i, j]:+.3f}", ha="center", va="center",
                    fontweight="bold" if tuned_on[i] == evaluated_on[j] else "normal")
            if tuned_on[i] == evaluated_on[j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2))
    ax.set_xticks(range(len(evaluated_on)), evaluated_on)
    ax.set_yticks(range(len(tuned_on)), tuned_on)
    ax.set(xlabel="evaluated on", ylabel="tuned on", title="mean delta r over the baseline (test story)")
    fig.colorbar(im, ax=ax)
    common.save_figure(fig, path)


def main(argv=None):
    args = get_args(argv)
    common.set_threads(args.threads)
    t0 = time.time()
    try:
        device = common.pick_device(args.device)
        study = common.load_study(args.data)
        tuned_on = common.subject_list(args.tuned_on, study)
        evaluated_on = common.subject_list(args.evaluate_on, study)
        subj_data = {s: common.load_subject(args.data, s, study) for s in evaluated_on}
        baselines = {s: common.load_npz(os.path.join(args.results, f"02_baseline_{s}.npz"), "stage 02 result")
                     for s in evaluated_on}
        print(f"stage 04: models tuned on {', '.join(tuned_on)} evaluated on {', '.join(evaluated_on)}")
        mean_delta = np.zeros((len(tuned_on), len(evaluated_on)), np.float32)
        out = {}
        for i, a in enumerate(tuned_on):
            model, layer, name, base = load_tuned(args, a, device)
            fp = common.model_fingerprint(model)
            stories = study["train"] + study["val"] + [study["test"]]
            features = {s: common.story_features(model, fp, os.path.join(args.data, "features", name),
                                                 os.path.join(args.data, "stories", f"{s}.npz"),
                                                 float(base["context_s"]), float(base["stride_s"]),
                                                 top_layer=layer, data=args.data)[layer] for s in stories}
            for j, b in enumerate(evaluated_on):
                r, _, _ = common.score_on_test(features, subj_data[b], study, device=device,
                                               **common.ridge_recipe(baselines[b]))
                delta = r - baselines[b]["test_r"]
                mean_delta[i, j] = delta.mean()
                out[f"test_r_{a}_on_{b}"] = r
                out[f"delta_r_{a}_on_{b}"] = delta
                print(f"  tuned on {a}, evaluated on {b}: mean r {r.mean():.4f} (baseline "
                      f"{baselines[b]['test_r'].mean():.4f}), delta {delta.mean():+.4f}", flush=True)
    except StudyError as e:
        common.fail(e)
    common.save_npz(os.path.join(args.results, "04_cross_subject.npz"), tuned_on=np.array(tuned_on),
                    evaluated_on=np.array(evaluated_on), mean_delta_r=mean_delta, roi=np.array(args.roi),
                    mode=np.array("full" if args.full_finetune else "lora"), seed=np.int64(args.seed), **out)
    plot(mean_delta, tuned_on, evaluated_on, os.path.join(args.results, "04_cross_subject.png"))
    print("\n  mean delta r (rows: tuned on, columns: evaluated on)")
    print("  " + " " * 10 + "".join(f"{b:>10s}" for b in evaluated_on))
    for i, a in enumerate(tuned_on):
        print(f"  {a:10s}" + "".join(f"{mean_delta[i, j]:+10.4f}" for j in range(len(evaluated_on))))
    off = mean_delta[[i for i in range(len(tuned_on))], :]
    mask = np.array([[a != b for b in evaluated_on] for a in tuned_on])
    if mask.any():
        print(f"  off-diagonal mean {off[mask].mean():+.4f}, min {off[mask].min():+.4f}")
    print(f"\nwrote {args.results}/04_cross_subject.npz and .png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
