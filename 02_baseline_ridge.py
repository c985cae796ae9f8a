"""Stage 02: the linear baseline. Frozen WavLM hidden states -> ridge -> every voxel.

The standard speech encoding model the paper starts from (Section 2.2 and the "baseline" of its
figures): causal WavLM features of each story, Lanczos-downsampled to the TRs, z-scored per story,
stacked at delays of 1-4 TRs, and mapped to each voxel by ridge regression with a per-voxel alpha
chosen by cross-validation over contiguous TR blocks. Layers are compared on the validation
stories, and one layer, the best mean over the study's subjects, is refit for each subject on its
train + validation stories and scored on the held-out test story (Pearson r per voxel, also as a
fraction of the noise ceiling).

    python 02_baseline_ridge.py                                      # simulated study, pretrained tiny WavLM
    python 02_baseline_ridge.py --model tiny                         # the same with a random tiny WavLM
    python 02_baseline_ridge.py --model microsoft/wavlm-base-plus    # real data, on a GPU

Features are cached under data/features/<model>/context<C>s_stride<S>s/, one folder per window setting.
"""
import json
import os
import time

import numpy as np

import common
from lib import anatomy, plumbing, provenance, scoring
from lib.plumbing import StudyError

DEFAULT_STRIDE_S = 4.0  # chosen from bench/features.py (README): 32x cheaper than the lab's 0.1 s


SETTINGS = ("model", "model_seed", "layers", "layer_choice", "context_s", "stride_s", "delays", "alphas", "n_folds",
            "sweep_voxels", "seed")  # what a result depends on: its file name carries a tag when one differs


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--model", default="tiny-pretrained", help="'tiny-pretrained' (this repository's "
                   "self-supervised tiny WavLM, models/), 'tiny' (random init) or a WavLM id/folder, "
                   "e.g. microsoft/wavlm-base-plus")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the tiny model's random weights")
    p.add_argument("--subjects", nargs="+", help="default: every subject in the study")
    p.add_argument("--layers", type=int, nargs="+", help="hidden states to compare (default: all)")
    p.add_argument("--layer-choice", choices=["study", "subject"], default="study", help="study: one layer for "
                   "every subject, the best mean validation r over all of them, so that comparisons across "
                   "subjects are at one layer (docs/methods.md); subject: each subject's own best")
    p.add_argument("--context-s", type=float, default=16.0, help="seconds of past audio per window (lab: 16)")
    p.add_argument("--stride-s", type=float, default=DEFAULT_STRIDE_S, help="window step (lab: 0.1)")
    p.add_argument("--delays", type=int, nargs="+", default=[1, 2, 3, 4],
                   help=f"delays in TRs (paper: 1 2 3 4; at most {common.PAD_TRS}; stage 03 uses the same)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(common.ALPHAS),
                   help="ridge penalties to search (default: logspace(0, 6, 13), see common.ALPHAS)")
    p.add_argument("--n-folds", type=int, default=5, help="cross-validation folds of contiguous TRs (>= 2)")
    p.add_argument("--sweep-voxels", type=int, default=0, help="compare layers on this many random voxels "
                   "(0: all); the best layer is then fit on every voxel. Cheaper for real data (README)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --sweep-voxels draw")
    p.add_argument("--save-weights", action="store_true", help="also write the ridge weights (features x "
                   "voxels: ~1 GB per subject for wavlm-base-plus on ds003020) to 02_weights_<subject>.npz")
    p.add_argument("--refresh-features", action="store_true", help="recompute the feature cache")
    p.add_argument("--reuse", metavar="DIR", help="when DIR (or RESULTS) holds every subject's result made from this "
                   "study and model with these settings by this code, link them into RESULTS instead (the quick loop)")
    return p


def get_args(argv=None):
    return get_parser().parse_args(argv)


def check_args(args):
    """Every flag's range, before any model or data is loaded: one clear error each."""
    plumbing.check_window(args.context_s, args.stride_s)
    plumbing.check_ranges([("--sweep-voxels", args.sweep_voxels, 0, None), ("--n-folds", args.n_folds, 2, None),
                         ("--delays", max(args.delays), None, common.PAD_TRS)])
    if min(args.alphas) <= 0:
        raise StudyError(f"--alphas {min(args.alphas):g} is out of range: ridge penalties must be > 0")
    if len(set(args.delays)) != len(args.delays):
        raise StudyError(f"--delays {' '.join(map(str, args.delays))} repeats a delay")


def settings(args, chosen_on=None):
    """The settings a stage 02 result depends on (the seed only matters with --sweep-voxels; the
    subjects a study-wide layer was chosen on, when they are not the whole study's)."""
    out = {k: getattr(args, k) for k in SETTINGS}
    out["seed"] = args.seed if args.sweep_voxels else 0
    if chosen_on:
        out["chosen_on"] = sorted(chosen_on)
    return out


def stack(features, stories, layer, delays):
    return np.vstack([common.design_matrix(features[s][layer], delays) for s in stories])


def story_features(model, fingerprint, study, args):
    """Every story's hidden states, downsampled to its TRs (layers x (PAD_TRS + TRs) x hidden), cached
    under data/features/<model>/context<C>s_stride<S>s/ (one folder per window setting)."""
    cache = plumbing.feature_cache_dir(args.data, args.model, args.model_seed, args.context_s, args.stride_s)
    features, stories = {}, study["train"] + study["val"] + [study["test"]]
    for i, s in enumerate(stories):
        print(f"  features {i + 1}/{len(stories)}: {s}", flush=True)
        features[s] = common.story_features(model, fingerprint, cache, os.path.join(args.data, "stories", f"{s}.npz"),
                                            args.context_s, args.stride_s, args.refresh_features, progress=True,
                                            data=args.data)
    return features


def layer_sweep(features, subject_data, study, layers, args, device):
    """Each layer fit on the training stories and scored on the validation stories: (validation r,
    layers x voxels swept; the voxels swept). With --sweep-voxels N, the sweep sees N voxels drawn at
    random (the layer choice is a mean over voxels, so a subset picks it at a fraction of the cost)."""
    train, val = study["train"], study["val"]
    n_vox = plumbing.array_shape(subject_data, "test_resp")[1]
    sweep = np.arange(n_vox)
    if args.sweep_voxels and args.sweep_voxels < n_vox:
        sweep = np.sort(np.random.default_rng(args.seed).choice(n_vox, args.sweep_voxels, replace=False))
        print(f"    layer sweep on {len(sweep)} of {n_vox} voxels (--sweep-voxels)", flush=True)
    voxels = sweep if len(sweep) < n_vox else None
    Y_train, Y_val = common.stack_responses(subject_data, train, voxels), common.stack_responses(subject_data, val, voxels)
    val_r = []
    for layer in layers:
        t0 = time.time()
        W, _, _ = common.ridge_cv(stack(features, train, layer, args.delays), Y_train, args.alphas,
                                  n_folds=args.n_folds, device=device)
        val_r.append(common.pearson_r(Y_val, common.ridge_predict(stack(features, val, layer, args.delays), W, device)))
        print(f"    layer {layer}: mean validation r {val_r[-1].mean():.4f} ({time.time() - t0:.0f} s)", flush=True)
    return np.array(val_r, np.float32), sweep


def choose_layer(val_r, layers, choice):
    """The best layer by mean validation r: {subject: layer}. 'study': one layer for all, the mean
    over subjects of each subject's mean over voxels; 'subject': each subject's own."""
    own = {subj: layers[int(np.argmax(r.mean(1)))] for subj, r in val_r.items()}
    if choice == "subject":
        return own
    best = layers[int(np.argmax(np.mean([r.mean(1) for r in val_r.values()], axis=0)))]
    return {subj: best for subj in val_r}


def print_table(results):
    """Each subject's best layer and mean test r, over all voxels, AC and the rest, and as a fraction
    of the noise ceiling."""
    print("\n  subject  best layer  mean r all    AC  non-AC  fraction of ceiling: all    AC  non-AC")
    for subj, (res, subject_data) in results.items():
        m = scoring.roi_means(res["test_r"], subject_data)
        frac = {k: scoring.frac_ceiling(res["test_r"][v], subject_data["noise_ceiling"][v])
                for k, v in scoring.roi_masks(subject_data, len(res["test_r"])).items()}
        print(f"  {subj:8s} {int(res['best_layer']):10d}  {m['all']:10.3f} {m.get('AC', np.nan):5.3f}"
              f"  {m.get('non-AC', np.nan):6.3f}  {frac['all']:24.2f} {frac.get('AC', np.nan):5.2f}"
              f"  {frac.get('non-AC', np.nan):6.2f}")


def plot(results, layers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def plot_flatmaps(results, path):
    """Each subject's test r on its flattened cortex, AC outlined (the paper's figures are flatmaps);
    drawn when stage 01 stored the subject's flatmap (the S1 study; ds003020 with --rois-from-pycortex)."""
    flat = {s: (res, d) for s, (res, d) in results.items() if "flat_index" in d}
    if not flat:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, len(flat), figsize=(5.5 * len(flat), 3.2), squeeze=False)
    vmax = max(float(np.quantile(res["test_r"], 0.99)) for res, _ in flat.values())
    for a, (subj, (res, d)) in zip(ax[0], flat.items()):
        im = anatomy.draw_flatmap(a, res["test_r"], d["flat_index"], d["flat_extents"], d.get("roi_AC"),
                                 f"{subj}: test r, layer {int(res['best_layer'])} (AC outlined)",
                                 cmap="inferno", vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax[0].tolist(), shrink=0.7, label="test r")
    plumbing.save_figure(fig, path)
    return path


def main(argv=None):
    args = get_args(argv)
    plumbing.set_threads(args.threads)
    t0 = time.time()
    try:
        check_args(args)
        device = plumbing.pick_device(args.device)
        study = common.load_study(args.data)
        subjects = plumbing.subject_list(args.subjects, study)
        subject_files = {s: common.load_subject(args.data, s, study) for s in subjects}
        model = common.load_wavlm(args.model, args.model_seed, device)
        n_states = model.config.num_hidden_layers + 1
        layers = args.layers if args.layers else list(range(n_states))
        if any(not 0 <= layer < n_states for layer in layers):
            raise StudyError(f"--layers {' '.join(map(str, layers))}: {args.model} has hidden states 0..{n_states - 1}")
        subset = args.layer_choice == "study" and len(layers) > 1 and set(subjects) != set(study["subjects"])
        mine, defaults = settings(args, subjects if subset else None), settings(get_args([]))
        tag, flags = provenance.settings_tag(mine, defaults), provenance.as_flags(mine, defaults)
        print(f"stage 02: baseline ridge, model {args.model}, {len(subjects)} subject(s), device {device}"
              + (f"; settings {' '.join(flags)} -> files tagged {tag[1:]}" if tag else ""))
        fingerprint = plumbing.model_fingerprint(model)
        # what each result is built from: later stages check it before using it
        provs = {subj: dict(stage="02", subject=subj, stories=study["stories_fingerprint"],
                            subject_data=study["subject_fingerprints"][subj], model=args.model,
                            model_fingerprint=fingerprint, settings=mine, tag=tag[1:], flags=flags,
                            code=provenance.code_state(__file__)) for subj in subjects}
        paths = {subj: os.path.join(args.results, f"02_baseline_{subj}{tag}.npz") for subj in subjects}
        if args.reuse and provenance.reuse({paths[s]: provs[s] for s in subjects}, args.reuse):
            print(f"  02_baseline_<subject>{tag}.npz: made from this study and model with these settings by this code, "
                  f"in {args.results}/ or linked from {args.reuse}/: nothing to do (--reuse)")
            return
        features = story_features(model, fingerprint, study, args)
        val_r, swept = {}, {}
        for subj in subjects:
            n_vox = plumbing.array_shape(subject_files[subj], "test_resp")[1]
            print(f"  subject {subj}: {n_vox} voxels, ridge per layer on the training stories", flush=True)
            val_r[subj], swept[subj] = layer_sweep(features, subject_files[subj], study, layers, args, device)
        own, best = choose_layer(val_r, layers, "subject"), choose_layer(val_r, layers, args.layer_choice)
        print(f"  layer {'for the study' if args.layer_choice == 'study' else 'per subject'}: "
              + ", ".join(f"{subj} {layer}" for subj, layer in best.items()), flush=True)
        results = {}
        for subj in subjects:
            subject_data = subject_files[subj]
            test_r, W, alphas = common.score_on_test({s: features[s][best[subj]] for s in features}, subject_data,
                                                     study, args.delays, args.alphas, device, args.n_folds)
            res = dict(test_r=test_r, val_r_by_layer=val_r[subj], best_layer=np.int64(best[subj]), alphas=alphas,
                       sweep_voxels=swept[subj], best_layer_own=np.int64(own[subj]),
                       layer_chosen_on=np.array(subjects if args.layer_choice == "study" else [subj]))
            if args.save_weights:  # apart from the results: stages 03-05 read those whole
                plumbing.save_npz(os.path.join(args.results, f"02_weights_{subj}{tag}.npz"), weights=W)
            del W
            prov, path = provs[subj], paths[subj]
            provenance.note_replacement(path, prov)
            plumbing.save_npz(path, **res, layers=np.array(layers), noise_ceiling=subject_data["noise_ceiling"],
                              model=np.array(args.model), model_seed=np.int64(args.model_seed),
                              context_s=np.float64(args.context_s), stride_s=np.float64(args.stride_s),
                              delays=np.array(args.delays), alpha_grid=np.array(args.alphas, np.float64),
                              n_folds=np.int64(args.n_folds), provenance=np.array(json.dumps(prov, sort_keys=True)))
            results[subj] = (res, subject_data)
    except StudyError as e:
        plumbing.fail(e)
    except KeyboardInterrupt:
        plumbing.fail("interrupted: subjects finished before it are saved; rerun the same command", 130)
    # a subset of subjects draws its own figure: it never replaces the full one
    subset = "" if subjects == study["subjects"] else "_" + "-".join(subjects)
    figure = os.path.join(args.results, f"02_baseline{tag}{subset}.png")
    plot(results, layers, figure)
    flatmaps = plot_flatmaps(results, os.path.join(args.results, f"02_flatmaps{tag}{subset}.png"))
    print_table(results)
    print(f"\nwrote {args.results}/02_baseline_<subject>{tag}.npz, {os.path.basename(figure)}"
          f"{' and ' + os.path.basename(flatmaps) if flatmaps else ''} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
