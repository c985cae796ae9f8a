"""Stage 03: BrainWavLM. Fine-tune WavLM end to end on brain responses, with LoRA.

The paper's method (Section 2.3): LoRA adapters on the attention's query/key/value projections of
WavLM, one hidden layer -> differentiable Lanczos to the TR times -> per-feature normalisation ->
delays of 1-4 TRs -> a bottleneck readout to the voxels, trained with the negative correlation
across voxels at each TR (the "spatial" correlation loss). The best epoch (validation stories) is
then scored "linearized" (Section 3.1): its features go through stage 02's exact ridge recipe, so
the tuned r is directly comparable with the baseline.

    python 03_finetune_lora.py                          # every subject, whole cortex, LoRA, seed 0
    python 03_finetune_lora.py --subject sim01 --roi AC
    python 03_finetune_lora.py --subject sim01 --seeds 0 1 2 --full-finetune   # the unstable comparison
    python 03_finetune_lora.py --subject sim01 --roi AC --init-from checkpoints/03_sim01_whole_lora_seed0
    python 03_finetune_lora.py --resume                 # continue a killed run

A training example is a block of consecutive TRs of one story with the audio that covers them (plus
the Lanczos window, the delays and a little left context); blocks are shuffled across stories each
epoch. Checkpoints: checkpoints/03_<subject>_<roi>_<lora|full>_seed<N>[_from_<run>]/ (the suffix
names the run an --init-from run started from).
"""
import argparse
import os
import shutil
import time

import numpy as np
import torch

import common
from common import StudyError

ROIS = ("whole", "AC", "LH", "RH")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder (default: checkpoints/)")
    p.add_argument("--subject", nargs="+", help="default: every subject in the study")
    p.add_argument("--roi", default="whole", help=f"voxels the loss sees: {'|'.join(ROIS)}")
    p.add_argument("--full-finetune", action="store_true", help="train all transformer weights, no LoRA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", help="run several seeds in turn (overrides --seed)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--patience", type=int, default=4, help="stop after this many epochs without a better val r")
    p.add_argument("--loss", choices=["corr", "mse"], default="corr")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--layer", type=int, help="hidden state to tune and read out (default: stage 02's best)")
    p.add_argument("--init-from", help="start from another stage 03 run's best epoch (its checkpoint folder, "
                   "e.g. checkpoints/03_sim01_whole_lora_seed0) with a fresh readout")
    g = p.add_argument_group("model (paper defaults)")
    g.add_argument("--lora-rank", type=int, default=4)
    g.add_argument("--lora-alpha", type=float, default=4)
    g.add_argument("--lora-dropout", type=float, default=0.1)
    g.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj"],
                   help="linear layers to adapt (paper: q_proj k_proj v_proj); others: out_proj, "
                   "intermediate_dense, output_dense, projection (the CNN -> transformer feature projection)")
    g.add_argument("--bottleneck", type=int, default=100, help="readout width; 0 = one linear map")
    g.add_argument("--lr-adapter", type=float, default=1e-4, help="learning rate of LoRA (or all) weights")
    g.add_argument("--lr-readout", type=float, default=1e-4)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g = p.add_argument_group("training examples")
    g.add_argument("--block-trs", type=int, default=32, help="TRs per training example")
    g.add_argument("--batch-blocks", type=int, default=2, help="examples per optimizer step")
    g.add_argument("--train-context-s", type=float, default=0.0,
                   help="extra past audio per training window (the forward pass dominates the cost)")
    g.add_argument("--train-stride-s", type=float, default=4.0, help="training window length/step")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The end-to-end model: WavLM layer -> norm -> Lanczos -> delays -> bottleneck readout
# ---------------------------------------------------------------------------------------------

def check_args(args):
    """Flags whose range argparse cannot know, as one clear error each."""
    if args.roi not in ROIS:
        raise StudyError(f"unknown ROI {args.roi!r}: choose one of {', '.join(ROIS)}")
    for flag, value, lo in (("--block-trs", args.block_trs, 1), ("--batch-blocks", args.batch_blocks, 1),
                            ("--epochs", args.epochs, 1), ("--patience", args.patience, 1),
                            ("--lora-rank", args.lora_rank, 1), ("--bottleneck", args.bottleneck, 0)):
        if value < lo:
            raise StudyError(f"{flag} {value} is out of range: it must be >= {lo}")
    for flag, value in (("--lr-adapter", args.lr_adapter), ("--lr-readout", args.lr_readout)):
        if not value > 0:
            raise StudyError(f"{flag} {value:g} is out of range: it must be > 0")
    if not 0 <= args.lora_dropout < 1:
        raise StudyError(f"--lora-dropout {args.lora_dropout:g} is out of range: it must be in [0, 1)")
    common.check_window(args.train_context_s, args.train_stride_s, ("--train-context-s", "--train-stride-s"))


def check_lora_targets(model, targets):
    """peft answers an unknown target with a traceback: name the model's adaptable layers instead."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.startswith("feature_extractor")})
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise StudyError(f"--lora-targets {' '.join(unknown)}: not a linear layer of this model; "
                         f"choose from {' '.join(linear)}")


def make_readout(n_in, n_vox, bottleneck):
    if bottleneck:
        return torch.nn.Sequential(torch.nn.Linear(n_in, bottleneck), torch.nn.Linear(bottleneck, n_vox))
    return torch.nn.Linear(n_in, n_vox)


def block_features(model, story, i0, i1, layer, args, delays=(1, 2, 3, 4), grad=True):
    """WavLM frames (frames x hidden, on the story's clock) covering rows i0..i1 of one story, plus
    the TR grid the readout needs (rows i0 - max(delays) .. i1). Differentiable through WavLM."""
    tr = np.mean(np.diff(story["tr_times"]))
    grid = story["tr_times"][0] + tr * np.arange(i0 - max(delays), i1)  # rows feeding the delays, too
    half = 3 * tr  # the Lanczos window reaches 3 TRs each side
    sr = 16000
    # segment edges on the story's own window grid (multiples of the stride), plus whole windows of
    # past context: the block's features are then exactly the whole story's at the same setting
    step = int(round(args.train_stride_s * sr))
    ctx = int(np.ceil(args.train_context_s / args.train_stride_s)) * step
    a = max(0, int((grid[0] - half) * sr) // step * step - ctx)
    b = min(len(story["audio"]), -(-int((grid[-1] + half) * sr + common.FRAME_WIN) // step) * step + common.FRAME_WIN)
    cnn = story.get("cnn")  # the frozen CNN's output, computed once per story (local CNNs)
    if cnn is not None:
        cnn = cnn[a // common.FRAME_HOP:a // common.FRAME_HOP + common.n_frames(b - a)]
    feats, times = common.extract_features(model, story["audio"][a:b], layers=[layer], grad=grad, cnn=cnn,
                                           context_s=args.train_context_s, stride_s=args.train_stride_s)
    return torch.as_tensor(feats[0], device=story["audio"].device), times + a / sr, grid


def readout_head(readout, frames, times, grid, delays=(1, 2, 3, 4)):
    """Frames -> differentiable Lanczos to the grid -> per-feature norm -> delays -> readout."""
    x = common.lanczos_interp(frames, times, grid)
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)  # per-feature normalisation over the block
    return readout(common.make_delayed(x, delays)[max(delays):])


def predict_block(model, readout, story, i0, i1, layer, args, delays=(1, 2, 3, 4), grad=True):
    """Predicted responses of rows i0..i1 of one story, differentiable through WavLM."""
    return readout_head(readout, *block_features(model, story, i0, i1, layer, args, delays, grad), delays)


def load_stories(model, data, names, device):
    """Audio and TR times of each story on `device`, plus the frozen CNN's output when it is
    frame-local (common.story_cnn), computed once (and cached on disk for the next run) rather than
    in every block of every epoch."""
    stories = {}
    for s in names:
        story_file = common.load_npz(os.path.join(data, "stories", f"{s}.npz"))
        audio = torch.as_tensor(story_file["audio"], device=device)
        stories[s] = dict(audio=audio, tr_times=story_file["tr_times"], cnn=common.story_cnn(model, audio, data, s))
    return stories


def spatial_corr_loss(pred, y):
    """-(1/T) sum_t corr_voxels(pred[t], y[t]): the paper's loss; blind to each TR's scale."""
    p = pred - pred.mean(1, keepdim=True)
    q = y - y.mean(1, keepdim=True)
    r = (p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1) + 1e-8)
    return -r.mean()


def predict_story(model, readout, story, layer, args):
    rows = len(story["tr_times"])
    with torch.no_grad():
        return torch.cat([predict_block(model, readout, story, i, min(rows, i + args.block_trs), layer, args,
                                        grad=False) for i in range(0, rows, args.block_trs)]).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Checkpoints: peft adapter (or full model) + readout, optimizer, RNG state, history
# ---------------------------------------------------------------------------------------------

def save_checkpoint(folder, model, readout, opt, epoch, history, origin):
    """origin: what the weights grew from (base model, its fingerprint, mode, LoRA shape), so a later
    --init-from can refuse a checkpoint that does not fit its run."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "model"))  # peft: adapter_config.json + adapter_model.safetensors
    torch.save(dict(readout=readout.state_dict(), opt=opt.state_dict(), epoch=epoch, history=history,
                    torch_rng=torch.get_rng_state(), origin=origin), os.path.join(tmp, "state.pt"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_model_weights(folder, model, full):
    """A checkpoint's WavLM weights (full) or LoRA adapters into the run's own model."""
    from safetensors.torch import load_file
    if full:
        common.base_wavlm(model).load_state_dict(load_file(os.path.join(folder, "model", "model.safetensors")))
    else:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(os.path.join(folder, "model", "adapter_model.safetensors")))


def load_weights(folder, model, readout, full):
    """Load a checkpoint into the run's own model and readout (the optimizer keeps pointing at them)."""
    load_model_weights(folder, model, full)
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    readout.load_state_dict(state["readout"])
    return state


def init_checkpoint(path, origin):
    """The best epoch of the stage 03 run at `path` (its folder, or its best/ or last/), checked to
    fit this run: same base model weights, same mode, same LoRA shape. Returns (folder, tag)."""
    path = path.rstrip("/")
    folder = os.path.join(path, "best") if os.path.isdir(os.path.join(path, "best")) else path
    state_path = os.path.join(folder, "state.pt")
    if not os.path.exists(state_path):
        raise StudyError(f"--init-from {path}: no stage 03 checkpoint there ({state_path} not found); "
                         "pass a folder like checkpoints/03_<subject>_whole_lora_seed0")
    theirs = torch.load(state_path, weights_only=True).get("origin")
    if theirs is None:
        raise StudyError(f"--init-from {path}: the checkpoint predates --init-from (no record of its base "
                         "model); rerun that stage 03 run")
    if theirs["fingerprint"] != origin["fingerprint"]:
        raise StudyError(f"--init-from {path} was tuned from another base model ({theirs['model']}, seed "
                         f"{theirs['model_seed']}) than stage 02's ({origin['model']}, seed {origin['model_seed']})")
    if theirs["mode"] != origin["mode"]:
        raise StudyError(f"--init-from {path} is a {theirs['mode']} checkpoint; this run is {origin['mode']}"
                         f" ({'drop' if origin['mode'] == 'full' else 'add'} --full-finetune)")
    if origin["mode"] == "lora" and theirs["lora"] != origin["lora"]:
        raise StudyError(f"--init-from {path} has another LoRA shape {theirs['lora']} than this run's "
                         f"{origin['lora']}; pass the same --lora-rank, --lora-alpha and --lora-targets")
    run_dir = os.path.dirname(folder) if os.path.basename(folder) in ("best", "last") else folder
    return folder, os.path.basename(run_dir).removeprefix("03_")


# ---------------------------------------------------------------------------------------------
# One run: train, keep the best epoch, evaluate linearized and end to end
# ---------------------------------------------------------------------------------------------

def roi_mask(args, subject_data, subj):
    """The voxels the loss sees (Section 3.2: whole cortex, AC, LH or RH)."""
    if args.roi == "whole":
        return np.ones(common.array_shape(subject_data, "test_resp")[1], bool)
    if f"roi_{args.roi}" not in subject_data:
        raise StudyError(f"{args.data}/subjects/{subj}.npz has no {args.roi} mask; for ds003020 pass "
                         "--roi-file or --rois-from-pycortex to 01_prepare_data.py")
    mask = subject_data[f"roi_{args.roi}"]
    if not mask.any():
        raise StudyError(f"the {args.roi} mask of {subj} is empty")
    return mask


def setup_model(args, baseline, seed, n_vox, device):
    """Section 2.3's model: stage 02's WavLM with LoRA on the chosen projections (or every
    transformer weight trainable), a fresh bottleneck readout, Adam with one learning rate for each.
    With --init-from, the adapters (or weights) start from that run's best epoch; the readout is new,
    since the new ROI has other voxels. Returns (model, readout, optimizer, origin, init)."""
    torch.manual_seed(seed)
    model = common.load_wavlm(str(baseline["model"]), int(baseline["model_seed"]), device)
    mode = "full" if args.full_finetune else "lora"
    origin = dict(model=str(baseline["model"]), model_seed=int(baseline["model_seed"]), mode=mode,
                  fingerprint=common.model_fingerprint(model),
                  lora=dict(rank=args.lora_rank, alpha=float(args.lora_alpha), targets=sorted(args.lora_targets)))
    init = init_checkpoint(args.init_from, origin) if args.init_from else None
    if args.full_finetune:
        for n, p_ in model.named_parameters():
            p_.requires_grad = not n.startswith("feature_extractor")
    else:
        check_lora_targets(model, args.lora_targets)
        model = common.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    if init:
        load_model_weights(init[0], model, args.full_finetune)
    torch.manual_seed(seed)  # the readout starts the same whether LoRA or full fine-tuning came before
    readout = make_readout(model.config.hidden_size * 4, n_vox, args.bottleneck).to(device)
    opt = torch.optim.Adam([{"params": [p_ for p_ in model.parameters() if p_.requires_grad], "lr": args.lr_adapter},
                            {"params": readout.parameters(), "lr": args.lr_readout}])
    return model, readout, opt, origin, init


def train(args, name, ckpt, model, readout, opt, origin, stories, resp, val_resp, layer, seed, device, study):
    """Epochs of shuffled blocks with the spatial-correlation loss; after each, the validation
    stories' mean r picks the best epoch (early stopping with --patience). Resumable from last/."""
    blocks = [(s, i) for s in study["train"] for i in range(0, len(stories[s]["tr_times"]), args.block_trs)]
    history, start = dict(val_r=[], loss=[]), 0
    if args.resume and os.path.exists(os.path.join(ckpt, "last", "state.pt")):
        state = load_weights(os.path.join(ckpt, "last"), model, readout, args.full_finetune)
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["epoch"] + 1
        print(f"  resuming {name} after epoch {start}")
    elif os.path.exists(ckpt) and not args.resume:
        shutil.rmtree(ckpt)
    for epoch in range(start, args.epochs):
        if history["val_r"] and epoch - 1 - int(np.argmax(history["val_r"])) >= args.patience:
            print(f"  early stop: no better validation r for {args.patience} epochs")
            break
        model.train()
        order = np.random.default_rng(seed * 1000 + epoch).permutation(len(blocks))  # seeded, resumable
        losses = []
        steps = range(0, len(order), args.batch_blocks)
        bar = common.progress_bar(steps, f"  {name} epoch {epoch + 1}")
        for k in bar:
            opt.zero_grad()
            for j in order[k:k + args.batch_blocks]:
                s, i0 = blocks[j]
                i1 = min(len(stories[s]["tr_times"]), i0 + args.block_trs)
                with common.autocast(device):
                    pred = predict_block(model, readout, stories[s], i0, i1, layer, args).float()
                y = resp[s][i0:i1]
                loss = spatial_corr_loss(pred, y) if args.loss == "corr" else torch.mean((pred - y) ** 2)
                (loss / args.batch_blocks).backward()
                losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_([p_ for g in opt.param_groups for p_ in g["params"]], args.grad_clip)
            opt.step()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        model.eval()
        val_r = np.mean([common.pearson_r(val_resp[s], predict_story(model, readout, stories[s], layer, args)).mean()
                         for s in study["val"]])
        history["val_r"].append(float(val_r))
        history["loss"].append(float(np.mean(losses)))
        best = int(np.argmax(history["val_r"]))
        print(f"  {name} epoch {epoch + 1}: loss {np.mean(losses):.4f}, val r {val_r:.4f}"
              f"{'  (best)' if best == epoch else ''}", flush=True)
        save_checkpoint(os.path.join(ckpt, "last"), model, readout, opt, epoch, history, origin)
        if best == epoch:
            save_checkpoint(os.path.join(ckpt, "best"), model, readout, opt, epoch, history, origin)
    if not history["val_r"]:
        raise StudyError(f"{name}: no epoch ran (--epochs {args.epochs})")
    return history


def evaluate(args, name, ckpt, model, readout, stories, subject_data, mask, layer, study, baseline, device):
    """The best epoch on the test story, two ways. End to end: the model's own predictions (ROI
    voxels only). Linearized (Section 3.1): its features through stage 02's exact ridge recipe, so
    the gain over the baseline compares like with like; those features are cached for stage 04.
    Returns (direct r, linearized r, the ridge's per-voxel alphas)."""
    load_weights(os.path.join(ckpt, "best"), model, readout, args.full_finetune)
    model.eval()
    direct = np.full(len(mask), np.nan, np.float32)
    predicted = predict_story(model, readout, stories[study["test"]], layer, args)
    direct[mask] = common.pearson_r(subject_data["test_resp"][:, mask], predicted)
    cache = os.path.join(args.data, "features", name)
    fingerprint = common.model_fingerprint(model)
    features = {s: common.story_features(model, fingerprint, cache, os.path.join(args.data, "stories", f"{s}.npz"),
                                         float(baseline["context_s"]), float(baseline["stride_s"]), refresh=True,
                                         top_layer=layer, cnn=stories[s]["cnn"])[layer]
                for s in stories}
    stories.clear()  # the audio (0.4x the responses) is done with: free it before the ridge reads them all
    tuned, _, tuned_alphas = common.score_on_test(features, subject_data, study, device=device,
                                                  **common.ridge_recipe(baseline))
    return direct, tuned, tuned_alphas


def run(args, subj, seed, study, device, baseline):
    """One run: set up the model, train it, evaluate its best epoch, save results and a figure."""
    subject_data = common.load_subject(args.data, subj, study)
    mask = roi_mask(args, subject_data, subj)
    layer = args.layer if args.layer is not None else int(baseline["best_layer"])
    model, readout, opt, origin, init = setup_model(args, baseline, seed, int(mask.sum()), device)
    if not 0 <= layer <= model.config.num_hidden_layers:
        raise StudyError(f"--layer {layer}: the model has hidden states 0..{model.config.num_hidden_layers}")
    name = common.run_name(subj, args.roi, origin["mode"], seed, init[1] if init else None)
    ckpt = os.path.join(args.checkpoints, name)
    stories = load_stories(model, args.data, study["train"] + study["val"] + [study["test"]], device)
    resp = {s: torch.as_tensor(subject_data[f"resp_{s}"][:, mask], device=device) for s in study["train"]}
    val_resp = {s: subject_data[f"resp_{s}"][:, mask] for s in study["val"]}
    history = train(args, name, ckpt, model, readout, opt, origin, stories, resp, val_resp, layer, seed, device, study)
    del resp  # the ridge below reads the responses again: never hold them twice (UTS01: ~10 GB each)

    direct, tuned, tuned_alphas = evaluate(args, name, ckpt, model, readout, stories, subject_data, mask, layer,
                                           study, baseline, device)
    out = dict(test_r_baseline=baseline["test_r"], test_r_tuned=tuned, alphas_tuned=tuned_alphas, test_r_direct=direct,
               val_r_by_epoch=np.array(history["val_r"], np.float32), loss_by_epoch=np.array(history["loss"], np.float32),
               best_epoch=np.int64(int(np.argmax(history["val_r"])) + 1), layer=np.int64(layer), roi_mask=mask,
               roi=np.array(args.roi), mode=np.array(origin["mode"]), seed=np.int64(seed), subject=np.array(subj),
               init_from=np.array(init[0] if init else ""),
               settings=np.array(str({k: v for k, v in vars(args).items() if k not in ("seeds", "subject")})))
    common.save_npz(os.path.join(args.results, f"{name}.npz"), **out)
    plot(out, subject_data, os.path.join(args.results, f"{name}.png"))
    return name, out, subject_data


def plot(out, subject_data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    b, t = out["test_r_baseline"], out["test_r_tuned"]
    ac = subject_data.get("roi_AC", np.zeros(len(b), bool))
    ax[0].scatter(b[~ac], t[~ac], s=6, label="non-AC")
    ax[0].scatter(b[ac], t[ac], s=6, label="AC")
    lim = [min(b.min(), t.min()), max(b.max(), t.max())]
    ax[0].plot(lim, lim, "k--", lw=1)
    ax[0].set(xlabel="baseline test r", ylabel="tuned test r (linearized)", title=str(out["subject"]))
    ax[0].legend()
    names = ["all"] + [r for r in ("AC", "LH", "RH") if f"roi_{r}" in subject_data]
    deltas = [np.mean(t - b)] + [np.mean((t - b)[subject_data[f"roi_{r}"]]) for r in names[1:]]
    ax[1].bar(names, deltas)
    ax[1].axhline(0, color="k", lw=1)
    ax[1].set(ylabel="mean delta r (tuned - baseline)", title=f"{out['roi']} {out['mode']} seed {int(out['seed'])}")
    common.save_figure(fig, path)


def main(argv=None):
    args = get_args(argv)
    common.set_threads(args.threads)
    t0 = time.time()
    rows = []
    try:
        check_args(args)
        device = common.pick_device(args.device)
        study = common.load_study(args.data)
        subjects = common.subject_list(args.subject, study)
        for subj in subjects:
            path = os.path.join(args.results, f"02_baseline_{subj}.npz")
            if not os.path.exists(path):
                raise StudyError(f"{path} not found: run `python 02_baseline_ridge.py --subjects {subj}` first")
            baseline = common.load_npz(path)
            for seed in args.seeds or [args.seed]:
                print(f"stage 03: {subj}, roi {args.roi}, {'full fine-tuning' if args.full_finetune else 'LoRA'},"
                      f" seed {seed}, device {device}", flush=True)
                name, out, subject_data = run(args, subj, seed, study, device, baseline)
                rows.append((name, out, subject_data))
    except StudyError as e:
        common.fail(e)
    print("\n  run                                   best epoch  mean delta r  (AC)    direct r")
    for name, out, subject_data in rows:
        delta = out["test_r_tuned"] - out["test_r_baseline"]
        ac = np.mean(delta[subject_data["roi_AC"]]) if "roi_AC" in subject_data else np.nan
        print(f"  {name:38s} {int(out['best_epoch']):5d}  {delta.mean():+11.4f}  {ac:+.4f}  {np.nanmean(out['test_r_direct']):8.4f}")
    if len(rows) > 1:
        gains = [np.mean(o["test_r_tuned"] - o["test_r_baseline"]) for _, o, _ in rows]
        across = "seeds" if len({str(o["subject"]) for _, o, _ in rows}) == 1 else "runs"  # not seeds if subjects differ
        print(f"  gain over {len(rows)} runs: mean {np.mean(gains):+.4f}, std across {across} {np.std(gains):.4f}")
    print(f"\nstage 03 done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
