"""Stage 03: BrainWavLM. Fine-tune WavLM end to end on brain responses, with LoRA.

The paper's method (Section 2.3): LoRA adapters on the attention's query/key/value projections of
WavLM, one hidden layer -> differentiable Lanczos to the TR times -> per-feature normalisation ->
the delays of stage 02's recipe (1-4 TRs) -> a bottleneck readout to the voxels, trained with the
negative correlation across voxels at each TR (the "spatial" correlation loss). The best epoch
(validation stories) is then scored "linearized" (Section 3.1): its features go through stage 02's
exact ridge recipe, so the tuned r is directly comparable with the baseline.

    python 03_finetune_lora.py                          # every subject, whole cortex, LoRA, seed 0
    python 03_finetune_lora.py --subject sim01 --roi AC
    # full fine-tuning, the paper's less stable comparison
    python 03_finetune_lora.py --subject sim01 --seeds 0 1 2 --full-finetune
    # AC tuning started from the subject's whole-cortex run
    python 03_finetune_lora.py --subject sim01 --roi AC --init-from whole
    # continue a killed run, with its own settings
    python 03_finetune_lora.py --subject sim01 --resume
    # the authors' training choices (docs/methods.md), after stage 02 --recipe authors
    python 03_finetune_lora.py --subject sim01 --recipe authors

A training example is a block of consecutive TRs of one story with the audio that covers them (plus
the Lanczos window and the delays); a step takes its blocks in one forward and one backward, and
blocks are shuffled across stories each epoch. A run is named 03_<subject>_<roi>_<lora|full>_seed<N>
[_<tag>][_from_<run>]: the tag (6 hex digits) appears when its settings or its stage 02 result
differ from the defaults, so runs with other settings never replace each other; _from_ names the
run an --init-from run started from. Results: results/<run>.npz and .png; checkpoints:
checkpoints/<run>/{best,last}/.
"""
import os

import numpy as np
import torch

import common
from lib import batching, checkpoints, inputs, plumbing
from lib.study import stack_responses
from lib.checkpoints import ROIS
from lib.plumbing import one_of, ranged, sample_seconds, stage, tag_type

# what a run depends on besides its subject, ROI, seed and stage 02 result: its name carries a tag
# when one differs from the defaults, and --resume continues with the saved values
TRAIN_SETTINGS = ("full_finetune", "epochs", "patience", "loss", "norm", "tune_stories", "layer",
                  "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "bottleneck",
                  "lr_adapter", "lr_readout", "grad_clip", "block_trs", "batch_blocks",
                  "train_context_s", "train_stride_s", "train_window_feature", "lanczos_floor",
                  "block_history", "block_order", "best_epoch", "readout_init", "layerdrop",
                  "mask_time_prob", "recipe")
POSITIVE = ranged(float, 0, above=True)
# the authors' released code (docs/methods.md, "Beside the authors' code"): brain_finetune.py's
# training windows (stage 02's), thresholded Lanczos, 10-TR blocks one per step in story order,
# InstanceNorm and zero-padded delays, xavier readout, no clipping, LoRA's dropout inactive
# (theirs adds B A to the weights), 20 epochs, wavlm-base-plus's LayerDrop and SpecAugment left on
# by model.train(); brain_best_linear.py's epoch choice
AUTHORS = dict(train_context_s=3.75, train_stride_s=0.25, train_window_feature="first",
               lanczos_floor=1e-10, block_trs=10, batch_blocks=1, block_history="zeros",
               norm="instance", block_order="stories", best_epoch="linearized", epochs=20,
               patience=20, readout_init="xavier", grad_clip=float("inf"), lora_dropout=0.0,
               layerdrop=0.1, mask_time_prob=0.05)


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder")
    p.add_argument("--subject", nargs="+", help="subjects to tune on, one run each (default: all)")
    p.add_argument("--joint", action="store_true", help="one run for all the --subject given: the "
                   "same adapters and bottleneck, an output layer per subject, the loss averaged "
                   "over them (beyond the paper: README)")
    p.add_argument("--roi", type=one_of(ROIS, "ROI"), default="whole",
                   help=f"voxels the loss sees: {'|'.join(ROIS)} (Section 3.2)")
    p.add_argument("--full-finetune", action="store_true", help="train all transformer weights, "
                   "no LoRA (the paper's less stable comparison)")
    p.add_argument("--seed", type=int, default=0, help="seed of the readout's initialisation, "
                   "block order, dropout")
    p.add_argument("--seeds", type=int, nargs="+", help="several seeds in turn (overrides --seed)")
    p.add_argument("--epochs", type=ranged(int, 1), default=10, help="training epochs (the best "
                   "on validation is kept)")
    p.add_argument("--patience", type=ranged(int, 1), default=4, help="stop after this many "
                   "epochs without a better validation r")
    p.add_argument("--loss", choices=["corr", "mse"], default="corr", help="corr: the paper's "
                   "spatial correlation (minus the correlation across voxels at each TR); mse: "
                   "mean squared error")
    p.add_argument("--resume", action="store_true", help="continue the run's last checkpoint "
                   "with its saved settings (a flag that differs from them is an error)")
    p.add_argument("--layer", type=ranged(int, 0), help="hidden state to tune and read out "
                   "(default: stage 02's)")
    p.add_argument("--init-from", help="start from another stage 03 run's best epoch with a fresh "
                   "readout: its checkpoint folder, or an ROI (e.g. whole: this subject's "
                   "whole-cortex run, same seed)")
    p.add_argument("--baseline-tag", type=tag_type, help="which stage 02 result, when results/ "
                   "holds several for a subject ('default': the one of stage 02's defaults)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer layers "
                   "(CUDA graphs on a GPU): the same numbers to float precision (bench/RESULTS.md "
                   "says whether it pays)")
    g = p.add_argument_group("model (paper defaults)")
    g.add_argument("--lora-rank", type=ranged(int, 1), default=4, help="rank of each adapter")
    g.add_argument("--lora-alpha", type=POSITIVE, default=4,
                   help="LoRA scaling (the update is alpha/rank x B A)")
    g.add_argument("--lora-dropout", type=ranged(float, 0, 0.99), default=0.1,
                   help="dropout on the adapters' input")
    g.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj"],
                   help="linear layers to adapt (paper: q_proj k_proj v_proj); others: out_proj, "
                   "intermediate_dense, output_dense, projection (the CNN -> transformer one)")
    g.add_argument("--bottleneck", type=ranged(int, 0), default=100,
                   help="readout width; 0 = one linear map")
    g.add_argument("--readout-init", choices=["default", "xavier"], default="default",
                   help="the readout's weights: torch's default or xavier-uniform (the authors')")
    g.add_argument("--norm", choices=["block", "instance", "none"], default="block",
                   help="block: z-score each feature over the training block before the delays "
                   "(the paper's InstanceNorm); instance: the authors' InstanceNorm1d (biased "
                   "variance, eps inside the root); none: leave it out")
    g.add_argument("--layerdrop", type=ranged(float, 0, 0.99), default=0.0, help="WavLM's "
                   "LayerDrop in training: each layer after the first skipped with this chance, "
                   "one draw a layer a forward (transformers'; the authors' train() leaves 0.1 on)")
    g.add_argument("--mask-time-prob", type=ranged(float, 0, 0.99), default=0.0, help="WavLM's "
                   "SpecAugment in training: spans of the config's mask_time_length frames (10) "
                   "replaced by the mask embedding, about this share of each window's frames, at "
                   "least mask_time_min_masks (2) spans (transformers'; the authors' train() "
                   "leaves wavlm-base-plus's 0.05 on)")
    g.add_argument("--lr-adapter", type=POSITIVE, default=1e-4, help="LoRA's (or all weights')")
    g.add_argument("--lr-readout", type=POSITIVE, default=1e-4, help="the readout's learning rate")
    g.add_argument("--grad-clip", type=POSITIVE, default=1.0, help="clip the gradient norm (inf: "
                   "never, as the authors)")
    g.add_argument("--best-epoch", choices=["validation", "linearized"], default="validation",
                   help="validation: the best end-to-end validation r; linearized: the authors', "
                   "each epoch's features through a ridge with the untuned model's alphas, the "
                   "untuned model a candidate too (common.linearized_val_r)")
    example_flags(p.add_argument_group("training examples"))
    plumbing.add_recipe(p, dict(authors=AUTHORS), help="authors: the defaults of the authors' "
                        "released code for " + ", ".join(sorted("--" + k.replace("_", "-")
                                                                for k in AUTHORS))
                        + " (docs/methods.md); needs stage 02's --recipe authors result")
    return p


def example_flags(g):
    """How a run cuts its stories into training examples and takes them."""
    g.add_argument("--block-trs", type=ranged(int, 1), default=32, help="TRs per training "
                   "example (normalised as one block: see common.readout_input)")
    g.add_argument("--batch-blocks", type=ranged(int, 1), default=2, help="examples per step")
    g.add_argument("--block-history", choices=["real", "zeros"], default="real", help="what a "
                   "block's first rows' delays read: the TRs before it, or zeros (the authors')")
    g.add_argument("--block-order", choices=["shuffled", "stories"], default="shuffled",
                   help="shuffled: across stories, anew each epoch; stories: story by story in "
                   "time order, one order for every epoch (the authors')")
    g.add_argument("--lanczos-floor", type=POSITIVE, help="set the training Lanczos kernel's "
                   "entries below this to 0 (the authors': 1e-10, which drops its negative lobes)")
    g.add_argument("--tune-stories", type=ranged(int, 1), help="tune on the first N training "
                   "stories only (default: all); the linearized scoring fits on all of them")
    g.add_argument("--train-context-s", type=sample_seconds(False), default=0.0, help="past "
                   "audio per training window, in seconds (stage 02 and the evaluation use 16; 0 "
                   "keeps training 5x cheaper: the forward pass dominates the cost, "
                   "docs/methods.md)")
    g.add_argument("--train-stride-s", type=sample_seconds(True), default=4.0,
                   help="training window length and step, seconds")
    g.add_argument("--train-window-feature", choices=batching.WINDOW_FEATURES, default="stride",
                   help="what a training window gives, as stage 02's --window-feature")


def get_args(argv=None):
    return get_parser().parse_args(argv)


def run_settings(args):
    """The training settings of a run, as recorded (LoRA's only for LoRA runs; targets sorted)."""
    out = {k: getattr(args, k) for k in TRAIN_SETTINGS
           if not (args.full_finetune and k.startswith("lora_"))}
    if "lora_targets" in out:
        out["lora_targets"] = sorted(out["lora_targets"])
    return out


DEFAULTS = run_settings(get_args([]))


# ---- one run: the model -> training -> the best epoch, end to end and linearized ----

def setup_model(args, baseline, seed, n_vox, device, prov=None):
    """Section 2.3's model: stage 02's WavLM with LoRA on the chosen projections (or every
    transformer weight trainable), a fresh bottleneck readout on stage 02's delays with an output
    layer per subject (n_vox: {subject: voxels}; several for --joint), Adam with one learning rate
    for each. With --init-from, the adapters (or weights) start from that run's best epoch; the
    readout is new, since the new ROI has other voxels. prov: the run's provenance record (made
    here from `baseline` if not given), its model filled in. Returns (model, readout, optimizer,
    provenance, init: (folder, name, fingerprint) or None)."""
    torch.manual_seed(seed)
    model = common.load_wavlm(str(baseline["model"]), int(baseline["model_seed"]), device)
    # training only (batching.hidden_states_from_cnn)
    model.config.layerdrop, model.config.mask_time_prob = args.layerdrop, args.mask_time_prob
    prov = checkpoints.with_model(prov or dict(stories=baseline["provenance"]["stories"],
                                               settings=run_settings(args)), args, baseline, model)
    init = checkpoints.init_checkpoint(args.init_from, prov) if args.init_from else None
    if args.full_finetune:
        for n, p_ in model.named_parameters():
            p_.requires_grad = not n.startswith("feature_extractor")
    else:
        model = common.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout,
                                args.lora_targets)
    if init:
        checkpoints.load_model_weights(init[0], model, args.full_finetune)
    torch.manual_seed(seed)  # the readout starts alike whether LoRA or full fine-tuning came first
    n_in = model.config.hidden_size * len(common.ridge_recipe(baseline)["delays"])
    readout = common.make_readout(n_in, n_vox, args.bottleneck, args.readout_init).to(device)
    trained = [p_ for p_ in model.parameters() if p_.requires_grad]
    opt = torch.optim.Adam([{"params": trained, "lr": args.lr_adapter},
                            {"params": readout.parameters(), "lr": args.lr_readout}], fused=True)
    return model, readout, opt, prov, init


def train(args, run, model, readout, opt, stories, resp, val_resp, layer, seed, delays, lin=None):
    """Epochs of shuffled blocks with the spatial-correlation loss (a joint run: its mean over the
    subjects, every subject's output layer fed by one forward of the same audio); after each, the
    validation stories' mean r picks the best epoch (early stopping with --patience; lin: the
    linearized choice's inputs, linearized_start, the untuned model a candidate too). best/ is
    saved before last/, so a crash between the two only repeats an epoch (the same numbers:
    seeded)."""
    first = next(iter(resp.values()))  # the subjects heard the same stories
    blocks = batching.training_blocks({s: len(stories[s]["tr_times"]) for s in first},
                                    args.block_trs, args.block_history)
    history, start = checkpoints.start_history(args, run, model, readout, opt)
    if lin is not None and "val_r_start" not in history:
        checkpoints.start_candidate(run, history, lin[0], model, readout, opt)
    for epoch in range(start, args.epochs):
        if history["val_r"] and epoch - checkpoints.best_epoch(history) >= args.patience:
            print(f"  early stop: no better validation r for {args.patience} epochs")
            break
        model.train()
        order = batching.block_order(blocks, seed, epoch, args.block_order)  # resumable
        loss_sum, n_blocks = 0.0, 0  # on the device: read once an epoch (or for the progress bar)
        steps = range(0, len(order), args.batch_blocks)
        for k in (bar := plumbing.progress_bar(steps, f"  {run['name']} epoch {epoch + 1}")):
            batch = [blocks[j] for j in order[k:k + args.batch_blocks]]
            opt.zero_grad()
            with plumbing.autocast(args.device):  # the paper's step: one forward, one backward
                x, in_x = common.block_inputs(model, stories, batch, layer, delays, args.norm,
                                              args.block_history, args.lanczos_floor)
                batch = [batch[j] for j in in_x]  # x's order: blocks of one length together
                rows, preds = [i1 - i0 for _, i0, i1 in batch], common.read_out(readout, x)
                ys = {subj: torch.cat([r[s][i0:i1] for s, i0, i1 in batch])
                      for subj, r in resp.items()}
                loss = sum(common.blocks_loss(preds[subj], ys[subj], rows, args.loss)
                           for subj in resp) / len(resp)  # the mean over a joint run's subjects
            (loss / args.batch_blocks).backward()
            params = [p_ for g in opt.param_groups for p_ in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            loss_sum, n_blocks = loss_sum + loss.detach(), n_blocks + len(batch)
            plumbing.show_loss(bar, k // args.batch_blocks, loss_sum, n_blocks)
        model.eval()
        val_r = val_score(args, model, readout, stories, val_resp, layer, delays, lin)
        checkpoints.end_epoch(run, epoch, history, float(loss_sum) / n_blocks, float(val_r), model,
                              readout, opt)
    return history


def val_score(args, model, readout, stories, val_resp, layer, delays, lin=None):
    """The validation stories' mean r, each subject's, then the mean over subjects: the model's own
    predictions, or (lin, --best-epoch linearized) its features through the ridge of each
    subject's training stories with the untuned model's alphas."""
    if lin is not None:
        _, window, study, recipe, fits = lin
        tuned, path = batching.merged(model), os.path.join(args.data, "stories", "{}.npz")
        feats = {s: common.story_features(tuned, None, None, path.format(s), *window[:2],
                                          top_layer=layer, cnn=stories[s]["cnn"],
                                          take=window[2])[layer]
                 for s in study["train"] + study["val"]}
        return np.mean([common.linearized_val_r(feats, Y, val_resp[subj], study, recipe, alphas,
                                                args.device)[0]
                        for subj, (Y, alphas) in fits.items()])
    preds = {s: common.predict_story(model, readout, stories[s], layer, args.block_trs, delays,
                                     args.norm, args.block_history, args.lanczos_floor)
             for s in next(iter(val_resp.values()))}
    return np.mean([np.mean([common.pearson_r(y, preds[s][subj]).mean() for s, y in v.items()])
                    for subj, v in val_resp.items()])


def linearized_start(args, layer, study, files, masks, baselines, val_resp):
    """--best-epoch linearized (the authors'): the untuned model's features through each subject's
    stage 02 ridge on the training stories give every voxel its alpha (epoch 0's) and the untuned
    model's validation r, itself a candidate. Returns (that r, stage 02's window, the study, its
    ridge recipe, {subject: (training responses, alphas)})."""
    base = next(iter(baselines.values()))
    recipe, untuned = common.ridge_recipe(base), common.untuned_features(base, layer, study,
                                                                         args.device)
    fits, scores = {}, []
    for subj, d in files.items():
        Y = stack_responses(d, study["train"], np.flatnonzero(masks[subj]))
        r, alphas = common.linearized_val_r(untuned, Y, val_resp[subj], study, recipe,
                                            device=args.device)
        fits[subj], scores = (Y, alphas), scores + [r]
    return float(np.mean(scores)), common.scoring_window(base), study, recipe, fits


def evaluate(args, run, model, readout, stories, files, masks, layer, study, baselines, delays):
    """The best epoch on the test story, two ways, for each subject. End to end: the model's own
    predictions (ROI voxels only). Linearized (Section 3.1): its features through stage 02's exact
    ridge recipe, so the gain over the baseline compares like with like; the features are cached
    for stage 04. Returns {subject: (direct r, linearized r, the ridge's per-voxel alphas)}."""
    checkpoints.load_weights(os.path.join(run["ckpt"], "best"), model, readout, args.full_finetune)
    model.eval()
    predicted = common.predict_story(model, readout, stories[study["test"]], layer,
                                     args.block_trs, delays, args.norm, args.block_history,
                                     args.lanczos_floor)
    fingerprint = plumbing.model_fingerprint(model)  # the tuned model's: stage 04 finds its cache
    merged, cache = batching.merged(model), os.path.join(args.data, "features", run["name"])
    window = common.scoring_window(next(iter(baselines.values())))  # the subjects' share it
    features = {s: common.story_features(
        merged, fingerprint, cache, os.path.join(args.data, "stories", f"{s}.npz"), *window[:2],
        refresh=True, top_layer=layer, cnn=stories[s]["cnn"], take=window[2])[layer]
        for s in stories}
    stories.clear()  # the audio (0.4x the responses) is done with before the ridge reads them all
    out = {}
    for subj, d in files.items():
        direct = np.full(len(masks[subj]), np.nan, np.float32)
        direct[masks[subj]] = common.pearson_r(d["test_resp"][:, masks[subj]], predicted[subj])
        recipe = common.ridge_recipe(baselines[subj])
        tuned, _, alphas = common.score_on_test(features, d, study, device=args.device, **recipe)
        out[subj] = (direct, tuned, alphas)
    return out


def run(args, subjects, seed, study, baselines):
    """One run: set up the model, train it, evaluate its best epoch on each of its subjects, save
    its result and figure. A single subject's run, or a joint run over several (--joint)."""
    files, masks = {}, {}
    for subj in subjects:
        files[subj], masks[subj] = inputs.subject_roi(args, subj, study)
    base = baselines[subjects[0]]
    layer = args.layer if args.layer is not None else int(base["best_layer"])
    delays = common.ridge_recipe(base)["delays"]  # the end-to-end model uses stage 02's delays
    args, prov = checkpoints.run_record(args, subjects, seed, study, baselines, run_settings(args),
                                        DEFAULTS, __file__)
    n_vox = {s: int(m.sum()) for s, m in masks.items()}
    model, readout, opt, prov, init = setup_model(args, base, seed, n_vox, args.device, prov)
    inputs.check_layer(layer, model)
    run, finished = checkpoints.open_run(args, prov, init)  # finished: --resume's end
    if finished is not None:
        return checkpoints.run_rows(run["name"], finished, files)
    if args.compile:
        batching.compile_layers(model)
    names = study["train"] + study["val"] + [study["test"]]
    stories = batching.load_stories(model, args.data, names, args.device, args.train_context_s,
                                    args.train_stride_s, args.train_window_feature)
    resp = {subj: {s: torch.as_tensor(files[subj][f"resp_{s}"][:, masks[subj]], device=args.device)
                   for s in study["train"][:args.tune_stories]} for subj in subjects}
    val_resp = {subj: {s: files[subj][f"resp_{s}"][:, masks[subj]] for s in study["val"]}
                for subj in subjects}
    lin = (linearized_start(args, layer, study, files, masks, baselines, val_resp)
           if args.best_epoch == "linearized" else None)
    history = train(args, run, model, readout, opt, stories, resp, val_resp, layer, seed, delays,
                    lin)
    del lin
    del resp  # the ridge below reads the responses again: never hold them twice (UTS01: ~10 GB)
    scores = evaluate(args, run, model, readout, stories, files, masks, layer, study, baselines,
                      delays)
    out = {subj: dict(test_r_baseline=baselines[subj]["test_r"], test_r_tuned=scores[subj][1],
                      test_r_untuned=common.untuned_r(baselines[subj], layer, files[subj], study,
                                                      args.device),  # like for like
                      alphas_tuned=scores[subj][2], test_r_direct=scores[subj][0],
                      roi_mask=masks[subj]) for subj in subjects}
    best = checkpoints.best_epoch(history)
    common_out = dict(layer=np.int64(layer), val_r_by_epoch=np.array(history["val_r"], np.float32),
                      loss_by_epoch=np.array(history["loss"], np.float32), delays=np.array(delays),
                      best_epoch=np.int64(best), roi=np.array(args.roi), seed=np.int64(seed),
                      mode=np.array(prov["mode"]), init_from=np.array(init[0] if init else ""),
                      val_r_start=np.float32(history.get("val_r_start", np.nan)))
    saved = checkpoints.save_run(args, run, out, common_out, files, init)
    return checkpoints.run_rows(run["name"], saved, files)


def print_summary(rows):
    """Each run's gain over the untuned model at its layer, over the whole cortex and in AC."""
    print("\n  run                                   best epoch  mean delta r  (AC)    direct r   "
          "(delta r: tuned - untuned at the run's layer)")
    gains = []
    for name, out, subject_data in rows:
        delta = out["test_r_tuned"] - out.get("test_r_untuned", out["test_r_baseline"])
        ac = np.mean(delta[subject_data["roi_AC"]]) if "roi_AC" in subject_data else np.nan
        gains.append(delta.mean())
        print(f"  {name:38s} {int(out['best_epoch']):5d}  {delta.mean():+11.4f}  {ac:+.4f}  "
              f"{np.nanmean(out['test_r_direct']):8.4f}")
    if len(rows) > 1:
        across = "seeds" if len({str(o["subject"]) for _, o, _ in rows}) == 1 else "runs"
        print(f"  gain over {len(rows)} runs: mean {np.mean(gains):+.4f}, std across {across} "
              f"{np.std(gains):.4f}")
    for name, out, d in [r for r in rows if "test_r_start" in r[1] and "roi_AC" in r[2]]:
        ac, start = d["roi_AC"], out["test_r_start"] - out["test_r_untuned"]  # its start run
        kept = (out["test_r_tuned"] - out["test_r_untuned"])[~ac].mean() / start[~ac].mean()
        over = (out["test_r_tuned"] - out["test_r_start"])[ac].mean()
        print(f"  {name}: AC {over:+.4f} over the run it started from; outside AC it keeps "
              f"{kept:.0%} of that run's gain ({start[~ac].mean():+.4f})")
    last = [name for name, out, _ in rows if int(out["best_epoch"]) == len(out["val_r_by_epoch"])]
    if last:  # validation was still improving when training stopped: the gain is measured mid-climb
        print(f"  the best epoch was the last in {len(last)} of {len(rows)} runs "
              f"({', '.join(last)}): more --epochs would tell whether they were still improving")


@stage(get_parser)
def main(args):
    study = inputs.study_for_tuning(args)
    subjects = plumbing.subject_list(args.subject, study)
    baselines = inputs.tuning_baselines(args, study, subjects)  # a joint run's: like for like
    rows, mode = [], "full fine-tuning" if args.full_finetune else "LoRA"
    for group in [subjects] if args.joint else [[s] for s in subjects]:
        for seed in args.seeds or [args.seed]:
            a = checkpoints.resume_args(args, group, seed, run_settings) if args.resume else args
            print(f"stage 03: {' '.join(group)}{' jointly' if args.joint else ''}, roi {args.roi}, "
                  f"{mode}, seed {seed}, device {args.device}", flush=True)
            with plumbing.on_interrupt(lambda: checkpoints.resume_hint(
                    args, a, group, seed, run_settings, DEFAULTS)):
                rows += run(a, group, seed, study, {s: baselines[s] for s in group})
    print_summary(rows)
    names = dict.fromkeys(name.split(" ")[0] for name, _, _ in rows)  # a joint run: once
    return ", ".join(f"{args.results}/{name}.npz" for name in names)


if __name__ == "__main__":
    main()
