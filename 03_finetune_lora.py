"""Stage 03: BrainWavLM. Fine-tune WavLM end to end on brain responses, with LoRA.

The paper's method (Section 2.3): LoRA adapters on the attention's query/key/value projections of
WavLM, one hidden layer -> differentiable Lanczos to the TR times -> per-feature normalisation ->
the delays of stage 02's recipe (1-4 TRs) -> a bottleneck readout to the voxels, trained with the
negative correlation across voxels at each TR (the "spatial" correlation loss). The best epoch
(validation stories) is then scored "linearized" (Section 3.1): its features go through stage 02's
exact ridge recipe, so the tuned r is directly comparable with the baseline.

    python 03_finetune_lora.py                          # every subject, whole cortex, LoRA, seed 0
    python 03_finetune_lora.py --subject sim01 --roi AC
    python 03_finetune_lora.py --subject sim01 --seeds 0 1 2 --full-finetune   # the unstable comparison
    python 03_finetune_lora.py --subject sim01 --roi AC --init-from whole        # from the whole-cortex run
    python 03_finetune_lora.py --subject sim01 --resume  # continue a killed run, with its own settings

A training example is a block of consecutive TRs of one story with the audio that covers them (plus
the Lanczos window, the delays and a little left context); blocks are shuffled across stories each
epoch. A run is named 03_<subject>_<roi>_<lora|full>_seed<N>[_<tag>][_from_<run>]: the tag (6 hex
digits) appears when its settings or its stage 02 result differ from the defaults, so runs with
other settings never replace each other; _from_ names the run an --init-from run started from.
Results: results/<run>.npz and .png; checkpoints: checkpoints/<run>/{best,last}/.
"""
import copy
import json
import os
import re
import textwrap
import time

import numpy as np
import torch

import common
from lib import anatomy, checkpoints, plumbing, provenance, scoring
from lib.checkpoints import ROIS
from lib.plumbing import StudyError

# what a run depends on besides its subject, ROI, seed and stage 02 result: its name carries a tag
# when one differs from the defaults, and --resume continues with the saved values
TRAIN_SETTINGS = ("full_finetune", "epochs", "patience", "loss", "norm", "tune_stories", "layer", "lora_rank",
                  "lora_alpha", "lora_dropout", "lora_targets", "bottleneck", "lr_adapter", "lr_readout", "grad_clip", "block_trs",
                  "batch_blocks", "train_context_s", "train_stride_s")


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder (default: checkpoints/)")
    p.add_argument("--subject", nargs="+", help="subjects to tune on, one run each (default: every subject)")
    p.add_argument("--roi", default="whole", help=f"voxels the loss sees: {'|'.join(ROIS)} (Section 3.2)")
    p.add_argument("--full-finetune", action="store_true", help="train all transformer weights, no LoRA "
                   "(the paper's less stable comparison)")
    p.add_argument("--seed", type=int, default=0, help="seed of the readout's initialisation, block order, dropout")
    p.add_argument("--seeds", type=int, nargs="+", help="run several seeds in turn (overrides --seed)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (the best on validation is kept)")
    p.add_argument("--patience", type=int, default=4, help="stop after this many epochs without a better val r")
    p.add_argument("--loss", choices=["corr", "mse"], default="corr", help="corr: the paper's spatial "
                   "correlation (minus the correlation across voxels at each TR); mse: mean squared error")
    p.add_argument("--resume", action="store_true", help="continue the run's last checkpoint with its saved "
                   "settings (a flag that differs from them is an error)")
    p.add_argument("--layer", type=int, help="hidden state to tune and read out (default: stage 02's best)")
    p.add_argument("--init-from", help="start from another stage 03 run's best epoch with a fresh readout: "
                   "its checkpoint folder, or an ROI (e.g. whole: this subject's whole-cortex run, same seed)")
    p.add_argument("--baseline-tag", help="which stage 02 result, when results/ holds several for a subject "
                   "(default: the only one; 'default': the file made with stage 02's defaults)")
    g = p.add_argument_group("model (paper defaults)")
    g.add_argument("--lora-rank", type=int, default=4, help="rank of each LoRA adapter")
    g.add_argument("--lora-alpha", type=float, default=4, help="LoRA scaling (the update is alpha/rank x B A)")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj"],
                   help="linear layers to adapt (paper: q_proj k_proj v_proj); others: out_proj, "
                   "intermediate_dense, output_dense, projection (the CNN -> transformer feature projection)")
    g.add_argument("--bottleneck", type=int, default=100, help="readout width; 0 = one linear map")
    g.add_argument("--norm", choices=["block", "none"], default="block", help="block: z-score each feature over "
                   "the training block before the delays (the paper's InstanceNorm); none: leave it out")
    g.add_argument("--lr-adapter", type=float, default=1e-4, help="learning rate of LoRA (or all) weights")
    g.add_argument("--lr-readout", type=float, default=1e-4, help="learning rate of the readout")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g = p.add_argument_group("training examples")
    g.add_argument("--block-trs", type=int, default=32, help="TRs per training example (normalised as one "
                   "block: see readout_input)")
    g.add_argument("--batch-blocks", type=int, default=2, help="examples per optimizer step")
    g.add_argument("--tune-stories", type=int, help="tune on the first N training stories only (default: all); "
                   "the linearized scoring still fits on every training story, as stage 02 did")
    g.add_argument("--train-context-s", type=float, default=0.0,
                   help="past audio per training window, in seconds (stage 02 and the evaluation use 16; 0 "
                   "keeps training 5x cheaper: the forward pass dominates the cost, docs/methods.md)")
    g.add_argument("--train-stride-s", type=float, default=4.0, help="training window length/step, seconds")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer layers (CUDA graphs on "
                   "a GPU): the same numbers to float precision; whether it pays: bench/RESULTS.md")
    return p


def get_args(argv=None):
    return get_parser().parse_args(argv)


def run_settings(args):
    """The training settings of a run, as recorded (LoRA's only for LoRA runs; targets sorted)."""
    out = {k: getattr(args, k) for k in TRAIN_SETTINGS if not (args.full_finetune and k.startswith("lora_"))}
    if "lora_targets" in out:
        out["lora_targets"] = sorted(out["lora_targets"])
    return out


DEFAULTS = run_settings(get_args([]))


def run_tag(args, baseline):
    """'' for the defaults' settings against stage 02's defaults' result with committed code, else
    '_' + 6 hex digits."""
    mine = dict(run_settings(args), baseline=baseline["tag"])
    mine.pop("full_finetune")
    code = provenance.code_state(__file__)
    if code["edited"]:  # code that differs from the git commit: a name of its own, never the reference's
        mine["code"] = code["fingerprint"]
    return provenance.settings_tag(mine, dict(DEFAULTS, baseline=""))


def check_args(args):
    """Every flag's range, before any data or model is loaded: one clear error each."""
    if args.roi not in ROIS:
        raise StudyError(f"unknown ROI {args.roi!r}: choose one of {', '.join(ROIS)}")
    plumbing.check_ranges([("--block-trs", args.block_trs, 1, None), ("--batch-blocks", args.batch_blocks, 1, None),
                         ("--epochs", args.epochs, 1, None), ("--patience", args.patience, 1, None),
                         ("--lora-rank", args.lora_rank, 1, None), ("--bottleneck", args.bottleneck, 0, None),
                         ("--lora-dropout", args.lora_dropout, 0, 0.99), ("--layer", args.layer or 0, 0, None),
                         ("--tune-stories", 1 if args.tune_stories is None else args.tune_stories, 1, None)])
    for flag, value in (("--lr-adapter", args.lr_adapter), ("--lr-readout", args.lr_readout),
                        ("--lora-alpha", args.lora_alpha), ("--grad-clip", args.grad_clip)):
        if not value > 0:
            raise StudyError(f"{flag} {value:g} is out of range: it must be > 0")
    plumbing.check_window(args.train_context_s, args.train_stride_s, ("--train-context-s", "--train-stride-s"))
    if args.baseline_tag not in (None, "default") and not re.fullmatch(r"[0-9a-f]{6}", args.baseline_tag):
        raise StudyError(f"--baseline-tag {args.baseline_tag!r}: a tag is 'default' or 6 hex digits, as in "
                         "02_baseline_<subject>_<tag>.npz")


def check_lora_targets(model, targets):
    """peft answers an unknown target with a traceback: name the model's adaptable layers instead."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.startswith("feature_extractor")})
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise StudyError(f"--lora-targets {' '.join(unknown)}: not a linear layer of this model; "
                         f"choose from {' '.join(linear)}")


def predict_story(model, readout, story, layer, args, delays):
    """A whole story's predicted responses, in training's blocks (no gradient)."""
    return common.predict_story(model, readout, story, layer, args.block_trs, delays, args.norm)


# ---------------------------------------------------------------------------------------------
# One run: set up -> train -> evaluate the best epoch (linearized and end to end) -> save
# ---------------------------------------------------------------------------------------------

def roi_mask(args, subject_data, subj):
    """The voxels the loss sees (Section 3.2: whole cortex, AC, LH or RH)."""
    if args.roi == "whole":
        return np.ones(plumbing.array_shape(subject_data, "test_resp")[1], bool)
    if f"roi_{args.roi}" not in subject_data:
        raise StudyError(f"{args.data}/subjects/{subj}.npz has no {args.roi} mask; for ds003020 pass "
                         "--roi-file or --rois-from-pycortex to 01_prepare_data.py")
    mask = subject_data[f"roi_{args.roi}"]
    if not mask.any():
        raise StudyError(f"the {args.roi} mask of {subj} is empty")
    return mask


def setup_model(args, baseline, seed, n_vox, device, prov=None):
    """Section 2.3's model: stage 02's WavLM with LoRA on the chosen projections (or every
    transformer weight trainable), a fresh bottleneck readout on stage 02's delays, Adam with one
    learning rate for each. With --init-from, the adapters (or weights) start from that run's best
    epoch; the readout is new, since the new ROI has other voxels. prov: the run's provenance (made
    here from `baseline` if not given); its model fields are filled in. Returns (model, readout,
    optimizer, provenance, init: (folder, name, fingerprint) or None)."""
    torch.manual_seed(seed)
    model = common.load_wavlm(str(baseline["model"]), int(baseline["model_seed"]), device)
    prov = dict(prov or dict(stories=baseline["provenance"]["stories"], settings=run_settings(args)),
                model=str(baseline["model"]), model_seed=int(baseline["model_seed"]),
                mode="full" if args.full_finetune else "lora", model_fingerprint=plumbing.model_fingerprint(model))
    init = checkpoints.init_checkpoint(args.init_from, prov) if args.init_from else None
    if args.full_finetune:
        for n, p_ in model.named_parameters():
            p_.requires_grad = not n.startswith("feature_extractor")
    else:
        check_lora_targets(model, args.lora_targets)
        model = common.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    if init:
        checkpoints.load_model_weights(init[0], model, args.full_finetune)
    torch.manual_seed(seed)  # the readout starts the same whether LoRA or full fine-tuning came before
    n_delays = len(common.ridge_recipe(baseline)["delays"])
    readout = common.make_readout(model.config.hidden_size * n_delays, n_vox, args.bottleneck).to(device)
    opt = torch.optim.Adam([{"params": [p_ for p_ in model.parameters() if p_.requires_grad], "lr": args.lr_adapter},
                            {"params": readout.parameters(), "lr": args.lr_readout}], fused=True)  # one kernel
    return model, readout, opt, prov, init


def train(args, name, ckpt, model, readout, opt, prov, stories, resp, val_resp, layer, seed, device, study, delays):
    """Epochs of shuffled blocks with the spatial-correlation loss; after each, the validation
    stories' mean r picks the best epoch (early stopping with --patience). best/ is saved before
    last/, so a crash between the two only repeats an epoch (the same numbers: seeded)."""
    blocks = [(s, i, min(len(stories[s]["tr_times"]), i + args.block_trs)) for s in study["train"][:args.tune_stories]
              for i in range(0, len(stories[s]["tr_times"]), args.block_trs)]
    history, start = dict(val_r=[], loss=[]), 0
    if args.resume:
        history, start = checkpoints.resume(ckpt, model, readout, opt, args.full_finetune)
    for epoch in range(start, args.epochs):
        if history["val_r"] and epoch - 1 - int(np.argmax(history["val_r"])) >= args.patience:
            print(f"  early stop: no better validation r for {args.patience} epochs")
            break
        model.train()
        order = np.random.default_rng(seed * 1000 + epoch).permutation(len(blocks))  # seeded, resumable
        loss_sum, n_blocks = 0.0, 0  # on the device: read once an epoch (or for the progress bar)
        steps = range(0, len(order), args.batch_blocks)
        bar = plumbing.progress_bar(steps, f"  {name} epoch {epoch + 1}")
        for k in bar:
            batch = [blocks[j] for j in order[k:k + args.batch_blocks]]
            opt.zero_grad()
            with plumbing.autocast(device):  # the paper's step: its blocks in one forward, one backward
                x, in_x = common.block_inputs(model, stories, batch, layer, delays, args.norm)
                batch = [batch[j] for j in in_x]  # x's order: blocks of one length together
                y = torch.cat([resp[s][i0:i1] for s, i0, i1 in batch])
                loss = common.blocks_loss(readout, x, y, [i1 - i0 for _, i0, i1 in batch], args.loss)
            (loss / args.batch_blocks).backward()
            torch.nn.utils.clip_grad_norm_([p_ for g in opt.param_groups for p_ in g["params"]], args.grad_clip)
            opt.step()
            loss_sum, n_blocks = loss_sum + loss.detach(), n_blocks + len(batch)
            if hasattr(bar, "set_postfix") and k % (20 * args.batch_blocks) == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / n_blocks:.3f}")
        mean_loss = float(loss_sum) / n_blocks
        model.eval()
        val_r = np.mean([common.pearson_r(val_resp[s], predict_story(model, readout, stories[s], layer, args, delays)).mean()
                         for s in study["val"]])
        history["val_r"].append(float(val_r))
        history["loss"].append(mean_loss)
        best = int(np.argmax(history["val_r"]))
        print(f"  {name} epoch {epoch + 1}: loss {mean_loss:.4f}, val r {val_r:.4f}"
              f"{'  (best)' if best == epoch else ''}", flush=True)
        if best == epoch:
            checkpoints.save_checkpoint(os.path.join(ckpt, "best"), model, readout, opt, epoch, history, prov)
        checkpoints.save_checkpoint(os.path.join(ckpt, "last"), model, readout, opt, epoch, history, prov)
    return history


def evaluate(args, name, ckpt, model, readout, stories, subject_data, mask, layer, study, baseline, device, delays):
    """The best epoch on the test story, two ways. End to end: the model's own predictions (ROI
    voxels only). Linearized (Section 3.1): its features through stage 02's exact ridge recipe, so
    the gain over the baseline compares like with like; those features are cached for stage 04.
    Returns (direct r, linearized r, the ridge's per-voxel alphas)."""
    checkpoints.load_weights(os.path.join(ckpt, "best"), model, readout, args.full_finetune)
    model.eval()
    direct = np.full(len(mask), np.nan, np.float32)
    predicted = predict_story(model, readout, stories[study["test"]], layer, args, delays)
    direct[mask] = common.pearson_r(subject_data["test_resp"][:, mask], predicted)
    cache = os.path.join(args.data, "features", name)
    fingerprint = plumbing.model_fingerprint(model)  # of the tuned model: stage 04 finds its cache by it
    merged = common.merged(model)
    features = {s: common.story_features(merged, fingerprint, cache, os.path.join(args.data, "stories", f"{s}.npz"),
                                         float(baseline["context_s"]), float(baseline["stride_s"]), refresh=True,
                                         top_layer=layer, cnn=stories[s]["cnn"])[layer]
                for s in stories}
    stories.clear()  # the audio (0.4x the responses) is done with: free it before the ridge reads them all
    tuned, _, tuned_alphas = common.score_on_test(features, subject_data, study, device=device,
                                                  **common.ridge_recipe(baseline))
    return direct, tuned, tuned_alphas


def run(args, subj, seed, study, device, baseline):
    """One run: set up the model, train it, evaluate its best epoch, save the result and a figure."""
    subject_data = common.load_subject(args.data, subj, study)
    mask = roi_mask(args, subject_data, subj)
    layer = args.layer if args.layer is not None else int(baseline["best_layer"])
    delays = common.ridge_recipe(baseline)["delays"]  # the end-to-end model uses stage 02's delays
    if args.init_from:
        args = copy.copy(args)
        args.init_from = checkpoints.init_source(args, subj, seed)
    prov = run_provenance(args, subj, seed, study, baseline)
    model, readout, opt, prov, init = setup_model(args, baseline, seed, int(mask.sum()), device, prov)
    if not 0 <= layer <= model.config.num_hidden_layers:
        raise StudyError(f"--layer {layer}: the model has hidden states 0..{model.config.num_hidden_layers}")
    name, finished = open_run(args, subj, seed, prov, init)  # its name; a finished --resume returns its result
    if finished is not None:
        return name, finished, subject_data
    if args.compile:
        common.compile_layers(model)
    ckpt = os.path.join(args.checkpoints, name)

    stories = common.load_stories(model, args.data, study["train"] + study["val"] + [study["test"]], device,
                                  args.train_context_s, args.train_stride_s)
    resp = {s: torch.as_tensor(subject_data[f"resp_{s}"][:, mask], device=device) for s in study["train"][:args.tune_stories]}
    val_resp = {s: subject_data[f"resp_{s}"][:, mask] for s in study["val"]}
    history = train(args, name, ckpt, model, readout, opt, prov, stories, resp, val_resp, layer, seed, device, study,
                    delays)
    del resp  # the ridge below reads the responses again: never hold them twice (UTS01: ~10 GB each)
    direct, tuned, tuned_alphas = evaluate(args, name, ckpt, model, readout, stories, subject_data, mask, layer,
                                           study, baseline, device, delays)
    untuned = scoring.untuned_r(baseline, layer, subject_data, study, args, device, {})  # like for like (--layer)

    out = dict(test_r_baseline=baseline["test_r"], test_r_untuned=untuned, test_r_tuned=tuned, alphas_tuned=tuned_alphas,
               test_r_direct=direct,
               val_r_by_epoch=np.array(history["val_r"], np.float32), loss_by_epoch=np.array(history["loss"], np.float32),
               best_epoch=np.int64(int(np.argmax(history["val_r"])) + 1), layer=np.int64(layer), roi_mask=mask,
               roi=np.array(args.roi), mode=np.array(prov["mode"]), seed=np.int64(seed), subject=np.array(subj),
               init_from=np.array(init[0] if init else ""), delays=np.array(delays),
               settings=np.array(json.dumps(run_settings(args), sort_keys=True)),
               provenance=np.array(json.dumps(prov, sort_keys=True)), fingerprint=np.array(provenance.digest(prov)))
    result = os.path.join(args.results, f"{name}.npz")
    provenance.note_replaced_run(result, out["fingerprint"])
    start = os.path.join(args.results, f"{init[1]}.npz") if init else None
    if start and os.path.exists(start):  # the run it started from, for the figure
        start = plumbing.load_npz(start)
        start = dict(name=provenance.describe_run(json.loads(str(start["provenance"]))), tuned=start["test_r_tuned"])
    else:
        start = None
    plot(out, subject_data, os.path.join(args.results, f"{name}.png"), start)
    plumbing.save_npz(result, **out)  # last: a run with its result file is finished (--resume skips it)
    return name, out, subject_data


def run_provenance(args, subj, seed, study, baseline):
    """What a run is built from (lib/provenance.py): the study, the subject's file, its settings and
    the stage 02 result it is scored against; setup_model adds the base model, open_run the run it
    started from."""
    return dict(stage="03", subject=subj, roi=args.roi, seed=seed, stories=study["stories_fingerprint"],
                subject_data=study["subject_fingerprints"][subj], settings=run_settings(args),
                tag=run_tag(args, baseline)[1:], flags=provenance.as_flags(run_settings(args), DEFAULTS),
                code=provenance.code_state(__file__),
                baseline=dict(file=os.path.basename(baseline["path"]), tag=baseline["tag"],
                              fingerprint=baseline["fingerprint"]))


def open_run(args, subj, seed, prov, init):
    """The run's name (lib/provenance.py) and, with --resume, its checks (lib/checkpoints.py):
    (name, the finished run's result or None)."""
    prov["init_from"] = dict(name=init[1], fingerprint=init[2]) if init else None
    tag = "_" + prov["tag"] if prov["tag"] else ""
    name = provenance.run_name(subj, args.roi, prov["mode"], seed, tag, init[1] if init else None)
    prov["flags"] += [f"--init-from {args.init_from}"] if init else []
    finished = checkpoints.start(os.path.join(args.checkpoints, name), os.path.join(args.results, f"{name}.npz"),
                                 prov, args.resume, args.epochs)
    return name, finished


def plot(out, subject_data, path, start=None):
    """Tuned against baseline r per voxel, the mean change per ROI and, where stage 01 stored the
    subject's flatmap, the change on the flattened cortex with AC outlined (the paper's figure).
    start: for an --init-from run, {name, tuned: test r} of the run it started from."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
        ax[1].bar(x + 0.2, [np.mean((t - start["tuned"])[m]) for m in masks], 0.4, label="over the run it started from")
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


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    explicit = provenance.explicit_flags(p, argv)
    plumbing.set_threads(args.threads)
    t0 = time.time()
    rows, current = [], {}
    try:
        check_args(args)
        device = plumbing.pick_device(args.device)
        study = common.load_study(args.data)
        subjects = plumbing.subject_list(args.subject, study)
        if args.tune_stories and args.tune_stories > len(study["train"]):
            raise StudyError(f"--tune-stories {args.tune_stories}: the study has {len(study['train'])} training stories")
        for subj in subjects:
            baseline = provenance.load_baseline(args, subj, study, provenance.baseline_tag_flag(args.baseline_tag))
            for seed in args.seeds or [args.seed]:
                run_args = checkpoints.resume_args(args, explicit, subj, seed, run_settings) if args.resume else args
                current.update(subject=subj, seed=seed, args=run_args)
                print(f"stage 03: {subj}, roi {args.roi}, {'full fine-tuning' if args.full_finetune else 'LoRA'},"
                      f" seed {seed}, device {device}", flush=True)
                rows.append(run(run_args, subj, seed, study, device, baseline))
    except StudyError as e:
        plumbing.fail(e)
    except KeyboardInterrupt:
        if not current:
            plumbing.fail("interrupted before any training; nothing was written", 130)
        a = current["args"]
        plumbing.fail("interrupted: continue with " + provenance.command(
            "03_finetune_lora.py", a, f"--subject {current['subject']}", f"--seed {current['seed']}",
            "" if a.roi == "whole" else f"--roi {a.roi}", "--full-finetune" if a.full_finetune else "",
            f"--init-from {args.init_from}" if args.init_from else "",
            f"--baseline-tag {args.baseline_tag}" if args.baseline_tag else "",
            *provenance.as_flags(run_settings(a), dict(DEFAULTS, full_finetune=a.full_finetune)), "--resume"), 130)
    print("\n  run                                   best epoch  mean delta r  (AC)    direct r   (delta r: tuned - "
          "untuned at the run's layer)")
    for name, out, subject_data in rows:
        delta = out["test_r_tuned"] - out.get("test_r_untuned", out["test_r_baseline"])
        ac = np.mean(delta[subject_data["roi_AC"]]) if "roi_AC" in subject_data else np.nan
        print(f"  {name:38s} {int(out['best_epoch']):5d}  {delta.mean():+11.4f}  {ac:+.4f}  {np.nanmean(out['test_r_direct']):8.4f}")
    if len(rows) > 1:
        gains = [np.mean(o["test_r_tuned"] - o.get("test_r_untuned", o["test_r_baseline"])) for _, o, _ in rows]
        across = "seeds" if len({str(o["subject"]) for _, o, _ in rows}) == 1 else "runs"  # not seeds if subjects differ
        print(f"  gain over {len(rows)} runs: mean {np.mean(gains):+.4f}, std across {across} {np.std(gains):.4f}")
    last = [name for name, out, _ in rows if int(out["best_epoch"]) == len(out["val_r_by_epoch"])]
    if last:  # validation was still improving when training stopped: the gain is measured mid-climb
        print(f"  the best epoch was the last in {len(last)} of {len(rows)} runs ({', '.join(last)}): "
              "more --epochs would tell whether they were still improving")
    print(f"\nstage 03 done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
