"""Pretrain the tiny WavLM self-supervised on synthetic speech, as WavLM was pretrained on real speech.

Why: the paper fine-tunes a *pretrained* WavLM. A random tiny model knows no sounds or words and has
nothing to forget, so the demo on it cannot show what tuning a pretrained model does. This script
makes the stand-in: HuBERT-style masked prediction (Hsu et al. 2021, the objective WavLM extends),
iteration 1, on speech from the study's own synthesizer. It never sees brain data, voxel labels or
the simulated semantic vectors. It lives in models/, beside the folder it writes, because it is not a
stage of the study: a user with real data loads microsoft/wavlm-base-plus instead and never runs it.

  * corpus: stage 01's synthesizer and topic-drift sentences (a real speech model also hears which
    words go together), with its own seed and none of the study's stories: 20 words per category
    (the study's 4 are the first of each, so its vocabulary is a subset), all 6 voices, 3 rates
  * targets: k-means units (K = 64) of 40-band log-mel energies and their frame-to-frame change, on
    WavLM's 20 ms frames; the units carry the sound's level too, which a random tiny WavLM loses
  * model: common.tiny_config(); the CNN stays frozen and random (every stage keeps it frozen), so
    its output is computed once for the whole corpus and each step only runs the transformer
  * objective: spans of 10 frames (start probability 0.08, about half the frames) replaced by a
    learned mask embedding; cross-entropy of the units of the masked frames, from the last layer
    through a linear head (dropped after training)

    python models/pretrain_tiny.py        # about 15 min on 2 cores -> models/wavlm-tiny-pretrained/

Prints held-out masked-unit accuracy as it trains, then a linear probe of word identity from each
layer (pretrained against the random model), the sha256 of every file written, and a figure
models/pretrain_tiny.png (training curve and probe).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from lib import batching, plumbing, simulate, speech  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=common.PRETRAINED_TINY, help="save_pretrained folder to write")
    p.add_argument("--seed", type=int, default=1234, help="seed of the corpus, units, masks and batches")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the initial weights (the CNN keeps them)")
    g = p.add_argument_group("corpus")
    g.add_argument("--n-stories", type=int, default=64)
    g.add_argument("--n-held-out", type=int, default=6, help="stories kept for accuracy and the word probe")
    g.add_argument("--story-seconds", type=float, default=120.0)
    g.add_argument("--words-per-category", type=int, default=20)
    g.add_argument("--n-voices", type=int, default=6)
    g.add_argument("--rates", type=int, nargs="+", default=[150, 175, 200], help="words per minute")
    g = p.add_argument_group("targets and objective")
    g.add_argument("--units", type=int, default=64, help="k-means clusters")
    g.add_argument("--mask-prob", type=float, default=0.08, help="probability a frame starts a masked span")
    g.add_argument("--mask-span", type=int, default=10, help="frames per masked span")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=4000)
    g.add_argument("--batch", type=int, default=8, help="crops per step")
    g.add_argument("--crop-s", type=float, default=8.0)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--eval-every", type=int, default=250)
    g.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Corpus: stage 01's synthesizer, more words, voices and rates, its own stories
# ---------------------------------------------------------------------------------------------

def make_corpus(args, rng):
    vocab, category, _, _ = simulate.make_vocabulary(
        types.SimpleNamespace(n_categories=len(simulate.CATEGORIES), words_per_category=args.words_per_category,
                              semantic_dim=16), rng)
    clips = []  # one "voice" per (voice, rate): make_story picks one per sentence
    for rate in args.rates:
        clips += speech.synthesize_all(list(vocab), speech.VOICES[:args.n_voices], rate)
    stories = []
    for _ in range(args.n_stories):
        audio, idx, on, off = simulate.make_story(args.story_seconds, vocab, category, clips, rng, len(clips))
        stories.append(dict(audio=audio, words=vocab[idx], word_onsets=on, word_offsets=off))
    return stories, vocab


def unit_features(audio):
    """40-band log-mel and its frame-to-frame change, one row per WavLM frame (20 ms hop, 25 ms window)."""
    mel, _ = speech.log_mel(audio, n_bands=40, hop=batching.FRAME_HOP, win=batching.FRAME_WIN)
    return np.concatenate([mel, np.diff(mel, axis=0, prepend=mel[:1])], 1)


def kmeans(x, k, rng, n_iter=25, n_fit=40000):
    """Lloyd's k-means on a random subset of rows; returns the centroids."""
    fit = x[rng.choice(len(x), min(n_fit, len(x)), replace=False)]
    c = fit[rng.choice(len(fit), k, replace=False)].copy()
    for _ in range(n_iter):
        lab = assign(fit, c)
        for j in range(k):
            if (lab == j).any():
                c[j] = fit[lab == j].mean(0)
    return c


def assign(x, c):
    return np.argmin((x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None], 1)


def span_mask(rng, shape, prob, span):
    """Boolean (batch x frames): each frame starts a masked span of `span` frames with `prob`."""
    starts = rng.random(shape) < prob
    mask = np.zeros(shape, bool)
    for d in range(span):
        mask[:, d:] |= starts[:, :shape[1] - d]
    return mask


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def masked_loss(model, head, embed, cnn, units, mask):
    states = batching.hidden_states_from_cnn(model, cnn, mask=mask, mask_embed=embed)
    logits = head(states[-1][mask])
    return torch.nn.functional.cross_entropy(logits, units[mask]), logits.argmax(1) == units[mask]


def pretrain(args, model, cnn, units, train_ids, held_ids, rng, log=print):
    """AdamW on the transformer, the mask embedding and the unit head; the CNN stays frozen."""
    hidden = model.config.hidden_size
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(hidden, args.units)
    embed = torch.nn.Parameter(torch.rand(hidden))  # WavLM initialises masked_spec_embed uniformly
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters()) + [embed]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.08)
    L = int(round(args.crop_s / (batching.FRAME_HOP / 16000)))

    def crops(ids, n, r):
        sid = r.choice(ids, n)
        start = [r.integers(0, len(cnn[i]) - L) for i in sid]
        c = torch.stack([cnn[i][a:a + L] for i, a in zip(sid, start)])
        u = torch.stack([torch.as_tensor(units[i][a:a + L]) for i, a in zip(sid, start)])
        return c, u, torch.as_tensor(span_mask(r, (n, L), args.mask_prob, args.mask_span))
    held = crops(held_ids, 48, np.random.default_rng(args.seed + 1))  # fixed held-out crops and masks
    curve = dict(step=[], loss=[], held_acc=[])

    def evaluate():
        model.eval()
        with torch.no_grad():
            _, hit = masked_loss(model, head, embed, *held)
        model.train()
        return float(hit.float().mean())
    curve["step"].append(0), curve["loss"].append(np.nan), curve["held_acc"].append(evaluate())
    log(f"  step 0: held-out masked-unit accuracy {curve['held_acc'][-1]:.3f} (chance {1 / args.units:.3f})")
    model.train()
    t0, losses = time.time(), []
    for step in range(1, args.steps + 1):
        loss, _ = masked_loss(model, head, embed, *crops(train_ids, args.batch, rng))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curve["step"].append(step), curve["loss"].append(float(np.mean(losses)))
            curve["held_acc"].append(evaluate())
            log(f"  step {step}/{args.steps}: train loss {np.mean(losses):.3f}, held-out masked-unit accuracy "
                f"{curve['held_acc'][-1]:.3f} ({time.time() - t0:.0f} s)")
            losses = []
    model.eval()
    return curve


def word_probe(model, stories, cnn, vocab):
    """Word identity from each layer: a ridge probe (stage 05's, whole stories held out) on each word
    token's mean frame; accuracy over the held-out stories' tokens."""
    X, y, groups = [], [], []
    for g, (st, c) in enumerate(zip(stories, cnn)):
        X.append(common.word_representations(model, st, c, 16.0, 4.0))
        y += [int(np.flatnonzero(vocab == w)[0]) for w in st["words"]]
        groups += [g] * len(st["words"])
    X, y = np.concatenate(X, 1), np.array(y)
    onehot = np.eye(len(vocab), dtype=np.float32)[y]
    return [common.probe(X[layer], onehot, np.array(groups), len(stories), classes=y) for layer in range(len(X))]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plot(curve, probe_random, probe_pre, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(curve["step"][1:], curve["loss"][1:], "o-")
    ax[0].set(xlabel="step", ylabel="train loss (masked frames)", title="Masked unit prediction")
    ax[1].plot(curve["step"], curve["held_acc"], "o-")
    ax[1].set(xlabel="step", ylabel="accuracy", title="Held-out masked-unit accuracy")
    layers = np.arange(len(probe_pre))
    ax[2].plot(layers, probe_random, "o-", label="random")
    ax[2].plot(layers, probe_pre, "o-", label="pretrained")
    ax[2].set(xlabel="hidden state", ylabel="accuracy", title="Word identity probe (held-out stories)")
    ax[2].legend()
    plumbing.save_figure(fig, path)


def main(argv=None):
    args = get_args(argv)
    plumbing.set_threads(args.threads)
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    print(f"pretraining the tiny WavLM -> {args.out}")
    stories, vocab = make_corpus(args, rng)
    hours = sum(len(s["audio"]) for s in stories) / 16000 / 3600
    print(f"  corpus: {len(stories)} stories, {hours:.2f} h, {len(vocab)} word types, "
          f"{args.n_voices} voices x {len(args.rates)} rates ({time.time() - t0:.0f} s)")
    model = common.load_wavlm("tiny", args.init_seed)  # CNN frozen; made exactly as the stages make it
    with torch.no_grad():
        cnn = [batching.story_cnn(model, st["audio"]) for st in stories]
    feats = [unit_features(st["audio"]) for st in stories]
    mu, sd = np.concatenate(feats).mean(0), np.concatenate(feats).std(0) + 1e-6
    feats = [(f - mu) / sd for f in feats]
    centroids = kmeans(np.concatenate(feats), args.units, rng)
    units = [assign(f, centroids) for f in feats]
    assert all(len(u) == len(c) for u, c in zip(units, cnn))
    print(f"  units: k-means K={args.units} on log-mel + deltas ({time.time() - t0:.0f} s)")
    ids = np.arange(len(stories))
    held_ids, train_ids = ids[-args.n_held_out:], ids[:-args.n_held_out]
    curve = pretrain(args, model, cnn, units, train_ids, held_ids, rng)
    print(f"  trained {args.steps} steps ({time.time() - t0:.0f} s); word identity probe by layer:")
    held = [stories[i] for i in held_ids]
    probe_pre = word_probe(model, held, [cnn[i] for i in held_ids], vocab)
    probe_random = word_probe(common.load_wavlm("tiny", args.init_seed), held, [cnn[i] for i in held_ids], vocab)
    for layer, (a, b) in enumerate(zip(probe_random, probe_pre)):
        print(f"    hidden state {layer}: random {a:.3f}  pretrained {b:.3f}  (chance {1 / len(vocab):.3f})")
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    log = dict(args={k: v for k, v in vars(args).items() if k != "out"}, corpus_hours=hours, curve=curve,
               word_probe_random=probe_random, word_probe_pretrained=probe_pre, seconds=time.time() - t0)
    json.dump(log, open(os.path.join(tmp, "pretrain_log.json"), "w"), indent=1)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    plot(curve, probe_random, probe_pre, os.path.join(os.path.dirname(args.out.rstrip("/")), "pretrain_tiny.png"))
    for f in sorted(os.listdir(args.out)):
        print(f"  sha256 {sha256(os.path.join(args.out, f))}  {os.path.join(args.out, f)}")
    print(f"done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
