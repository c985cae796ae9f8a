"""The stages' figures: each stage's results drawn, one function per figure, saved atomically.

Used by stage 02 (baseline, baseline_flatmaps), stage 03 (tuned_run), stage 04 (cross_subject,
data_efficiency) and stage 05 (probes). The flatmaps draw on the subject's flattened cortex that
stage 01 stored (lib/anatomy.draw_flatmap, no pycortex needed).
"""
import json
import os
import textwrap

import numpy as np

from lib import anatomy, plumbing, provenance, scoring


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---- stage 02 ----

def baseline(results, layers, path):
    plt = _pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for subj, (res, subject_data) in results.items():
        ax[0].plot(layers, res["val_r_by_layer"].mean(1), "o-", label=subj)
        ax[2].scatter(subject_data["noise_ceiling"], res["test_r"], s=6, alpha=0.6, label=subj)
    ax[0].set(xlabel="hidden state (0 = transformer input)", ylabel="mean validation r", title="Layer sweep")
    ax[0].legend()
    rois = ["all", "AC", "non-AC"]
    width = 0.8 / len(results)
    for i, (subj, (res, subject_data)) in enumerate(results.items()):
        m = scoring.roi_means(res["test_r"], subject_data)
        ax[1].bar(np.arange(len(rois)) + i * width, [m.get(k, np.nan) for k in rois], width, label=subj)
    ax[1].set_xticks(np.arange(len(rois)) + width * (len(results) - 1) / 2, rois)
    ax[1].set(ylabel="mean test r", title="Best layer, test story, by ROI")
    ax[2].plot([0, 1], [0, 1], "k--", lw=1)
    ax[2].set(xlabel="noise ceiling", ylabel="test r", title="Test r against the noise ceiling")
    plumbing.save_figure(fig, path)


# ---- stage 02 ----

def baseline_flatmaps(results, path):
    """Each subject's test r on its flattened cortex, AC outlined (the paper's figures are flatmaps);
    drawn when stage 01 stored the subject's flatmap (the S1 study; ds003020 with --rois-from-pycortex)."""
    flat = {s: (res, d) for s, (res, d) in results.items() if "flat_index" in d}
    if not flat:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(1, len(flat), figsize=(5.5 * len(flat), 3.2), squeeze=False)
    vmax = max(float(np.quantile(res["test_r"], 0.99)) for res, _ in flat.values())
    for a, (subj, (res, d)) in zip(ax[0], flat.items()):
        im = anatomy.draw_flatmap(a, res["test_r"], d["flat_index"], d["flat_extents"], d.get("roi_AC"),
                                 f"{subj}: test r, layer {int(res['best_layer'])} (AC outlined)",
                                 cmap="inferno", vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax[0].tolist(), shrink=0.7, label="test r")
    plumbing.save_figure(fig, path)
    return path


def baseline_figures(results, subject_files, layers, folder, suffix):
    """Stage 02's figures: the layer sweep, test r by ROI and against the ceiling (02_baseline
    <suffix>.png) and, where stage 01 stored flatmaps, test r on the cortex (02_flatmaps<suffix>.png).
    Returns their names, in words."""
    pairs = {s: (res, subject_files[s]) for s, res in results.items()}
    figure = os.path.join(folder, f"02_baseline{suffix}.png")
    baseline(pairs, layers, figure)
    flatmaps = baseline_flatmaps(pairs, os.path.join(folder, f"02_flatmaps{suffix}.png"))
    return os.path.basename(figure) + (f" and {os.path.basename(flatmaps)}" if flatmaps else "")


# ---- stage 03 ----

def tuned_run(out, subject_data, path, start=None):
    """Tuned against baseline r per voxel, the mean change per ROI and, where stage 01 stored the
    subject's flatmap, the change on the flattened cortex with AC outlined (the paper's figure).
    start: for an --init-from run, {name, tuned: test r} of the run it started from."""
    plt = _pyplot()
    flat = "flat_index" in subject_data
    fig = plt.figure(figsize=(10, 7.5 if flat else 4))
    ax = [fig.add_subplot(2 if flat else 1, 2, k) for k in (1, 2)]
    b, t = out["test_r_untuned"], out["test_r_tuned"]  # the untuned model at the run's layer (stage 02's, by default)
    ac = subject_data.get("roi_AC", np.zeros(len(b), bool))
    ax[0].scatter(b[~ac], t[~ac], s=4, alpha=0.5, label="non-AC")
    ax[0].scatter(b[ac], t[ac], s=4, alpha=0.7, label="AC")
    lim = [min(b.min(), t.min()), max(b.max(), t.max())]
    ax[0].plot(lim, lim, "k--", lw=1)
    ax[0].set(xlabel="untuned test r (same layer)", ylabel="tuned test r (linearized)", title=str(out["subject"]))
    ax[0].legend()
    names = ["all"] + [r for r in ("AC", "LH", "RH") if f"roi_{r}" in subject_data]
    masks = [np.ones(len(b), bool)] + [subject_data[f"roi_{r}"] for r in names[1:]]
    x = np.arange(len(names))
    ax[1].bar(x - 0.2 * bool(start), [np.mean((t - b)[m]) for m in masks], 0.4 if start else 0.8,
              label="over the untuned model")
    what = [provenance.describe_run(json.loads(str(out["provenance"])))]
    if start:  # an --init-from run: its change over the run it started from, too
        label = "over the run it started from"
        if "AC" in names:  # the share of that run's gain it keeps outside AC (claim 2)
            out_ac = ~masks[names.index("AC")]
            kept = np.mean((t - b)[out_ac]) / np.mean((start["tuned"] - b)[out_ac])
            label += f"\n(keeps {kept:.0%} of that run's gain outside AC)"
        ax[1].bar(x + 0.2, [np.mean((t - start["tuned"])[m]) for m in masks], 0.4, label=label)
        ax[1].legend(fontsize=7)
        what.append(f"started from: {start['name']}")
    ax[1].axhline(0, color="k", lw=1)
    ax[1].set_xticks(x, names)
    ax[1].set_title("\n".join(line for part in what for line in textwrap.wrap(part, 55, break_on_hyphens=False)),
                    fontsize=9)
    ax[1].set(ylabel="mean delta r (linearized test r)")
    if flat:
        delta = t - b
        lim = float(np.quantile(np.abs(delta), 0.99)) or 1.0
        a = fig.add_subplot(2, 1, 2)
        im = anatomy.draw_flatmap(a, delta, subject_data["flat_index"], subject_data["flat_extents"],
                                 subject_data.get("roi_AC"), f"delta r, {out['roi']}-tuned {out['mode']} (AC outlined)",
                                 cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=a, shrink=0.8, label="tuned - baseline r")
    plumbing.save_figure(fig, path)


# ---- stage 04 ----

def cross_subject(mean_delta, tuned_on, evaluated_on, path, runs=""):
    """The like-for-like gain of each tuned model on each subject; `runs`: the runs, in words."""
    plt = _pyplot()
    title = "\n".join(["mean delta r over the untuned model at the same layer"]
                      + textwrap.wrap(f"runs: {runs}", 60, break_on_hyphens=False))
    if len(tuned_on) == 1:  # one tuned model: a bar per subject it is scored on, not a one-row heatmap
        fig, ax = plt.subplots(figsize=(1.2 * len(evaluated_on) + 3, 3.6))
        ax.bar(range(len(evaluated_on)), mean_delta[0], color=["C1" if s == tuned_on[0] else "C0" for s in evaluated_on])
        ax.axhline(0, color="k", lw=1)
        ax.set_xticks(range(len(evaluated_on)), [f"{s}{' (own)' if s == tuned_on[0] else ''}" for s in evaluated_on])
        ax.set(xlabel="evaluated on", ylabel="mean delta r", title=f"{tuned_on[0]}'s tuned model:\n{title}")
        plumbing.save_figure(fig, path)
        return
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
    ax.set(xlabel="evaluated on", ylabel="tuned on", title=title)
    fig.colorbar(im, ax=ax)
    plumbing.save_figure(fig, path)


# ---- stage 05 ----

def probes(scores, spreads, models, layers, probe_names, path, subject, runs):
    """Each probe's score by hidden state, one line per model, +- its sd across the held-out folds
    (models side by side); the legend names the runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, len(probe_names), figsize=(4.5 * len(probe_names), 4.4), squeeze=False)
    for k, name in enumerate(probe_names):
        for m, model in enumerate(models):
            ax[0, k].errorbar(np.array(layers) + 0.06 * (m - (len(models) - 1) / 2), scores[m, :, k], spreads[m, :, k],
                              fmt="o-", capsize=2, label=f"{model}: {runs[model]}" if model in runs else
                              f"{model}: untuned (stage 02's model)")
        ax[0, k].set_xticks(layers)  # hidden states are whole numbers
        ax[0, k].set(xlabel="hidden state (0: the transformer's input)",
                     ylabel=("accuracy" if name == "category" else "mean r") + " (held-out stories; +- sd across folds)",
                     title=f"{name} probe")
    handles, names = ax[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=1, fontsize=7, frameon=False)
    fig.suptitle(f"Linear probes of {subject}'s models: word representations -> targets")
    fig.subplots_adjust(bottom=0.18 + 0.05 * len(models), top=0.85, wspace=0.3)
    plumbing.save_figure(fig, path)


def data_efficiency(sizes, curves, needed, path):
    """Stage 04 --data-efficiency: for each subject a joint run never saw, mean test r against the
    stories the ridge was fit on, one line per kind of features (untuned, each model tuned on one
    other subject, the joint model of the others), the untuned level with every story dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.8), squeeze=False)
    for a, (b, kinds) in zip(ax[0], curves.items()):
        for k, c in kinds.items():
            style = dict(color="k") if k == "untuned" else dict(lw=2.2) if k.startswith("joint-") else {}
            n = needed[b][k]
            a.plot(sizes, c, "o-", label=f"{k} (matches at {n:.1f})" if np.isfinite(n) else f"{k} (never)",
                   **style)
        a.axhline(kinds["untuned"][-1], color="k", ls="--", lw=1)
        a.set_xscale("log", base=2)
        a.set_xticks(sizes, [str(s) for s in sizes])
        a.set(xlabel="stories the ridge is fit on", ylabel="mean test r", title=f"{b}, unseen in tuning")
        a.legend(fontsize=7)
    fig.suptitle("Data efficiency: stories needed to reach the untuned model with all of them (dashed)")
    fig.tight_layout()
    plumbing.save_figure(fig, path)
