"""The authors' choices (docs/methods.md, "Beside the authors' code"), each against a small
independent implementation of the rule their released code applies (chengemily1/brain-id-abstract,
scripts/finetuning at 07bb862; the lab's ridge_utils), written here from that code's description,
not from this repository's functions; and --recipe authors, which sets them at once."""
import math

import numpy as np
import pytest
import torch

import common
from helpers import fails_cleanly, run_stage, stage
from lib import batching, checkpoints, plumbing

SR = 16000


def lanczos_authors(old, new, window=3):
    """interpdata_torch.lanczosfun as brain_finetune.get_lanczos_mat_fir uses it, thresholded as
    brain_finetune.py does after its float32 cast."""
    cutoff = 1.0 / np.mean(np.diff(new))
    t = (np.asarray(new)[:, None] - np.asarray(old)[None, :]) * cutoff
    with np.errstate(divide="ignore", invalid="ignore"):
        k = window * np.sin(math.pi * t) * np.sin(math.pi * t / window) / (math.pi ** 2 * t ** 2)
    k[t == 0] = 1.0
    k[np.abs(t) > window] = 0.0
    k = k.astype(np.float32)
    k[k < 1e-10] = 0
    return k


def slide_window_authors(n_samples, window=64000, stride=4000):
    """extract_features_hf.slide_window: partial windows ending at stride, 2 stride, ... below the
    window's length, then every full window (unfold) ending on a multiple of the stride."""
    ends = list(range(stride, window, stride)) + [e for e in range(window, n_samples + 1, stride)]
    return [(max(0, e - window), e) for e in ends if e <= n_samples]


def delay_features_authors(x, delays=(1, 2, 3, 4)):
    """brain_finetune.DelayFeatures: row t holds x[t - 1], ..., x[t - 4], zeros before row 0."""
    out = np.zeros((len(x), len(delays) * x.shape[1]), np.float32)
    for t in range(len(x)):
        for j, d in enumerate(delays):
            if t - d >= 0:
                out[t, j * x.shape[1]:(j + 1) * x.shape[1]] = x[t - d]
    return out


@pytest.fixture(scope="module")
def model():
    return common.load_wavlm("tiny", seed=2)


@pytest.fixture(scope="module")
def audio():
    return np.random.default_rng(5).standard_normal(int(6.3 * SR)).astype(np.float32) * 0.1


def naive_window_features(model, audio, layer, take):
    """Each authors' window alone through stock transformers' forward, frame 0 (or -1) of the
    hidden state: features and their times (the window's end)."""
    out, times = [], []
    with torch.no_grad():
        for s, e in slide_window_authors(len(audio)):
            h = model(torch.tensor(audio[None, s:e]), output_hidden_states=True).hidden_states[layer][0]
            out.append(h[0 if take == "first" else -1].numpy())
            times.append(e / SR)
    return np.array(out), np.array(times)


@pytest.mark.parametrize("take", ["first", "last"])
def test_one_frame_per_window_is_the_authors_slide_window(model, audio, take):
    """--window-feature first: 4 s windows ending every 0.25 s (the first 16 shorter, all starting
    at the story's start), each alone through WavLM, its first frame, stamped at the window's end;
    'last' takes its last frame. The windows start between two of the story's frames every other
    step, so the CNN output must be the window's own."""
    feats, times = common.extract_features(model, audio, layers=[2], context_s=3.75, stride_s=0.25,
                                           take=take)
    ref, ref_times = naive_window_features(model, audio, 2, take)
    assert len(ref) == len(audio) // 4000 == 25
    np.testing.assert_array_equal(times, ref_times)
    np.testing.assert_allclose(feats[0], ref, atol=2e-4, rtol=1e-4)


def test_the_authors_training_kernel_drops_its_negative_lobes(model, audio):
    """block_kernel with the authors' floor is their float32 kernel with entries below 1e-10 set to
    zero: the negative lobes (1-2 TRs away) gone, the third lobes kept; without a floor, the full
    kernel (with negative entries)."""
    story = batching.story_windows(model, torch.tensor(audio), np.arange(6.0, 20.0, 2.0), 3.75, 0.25, "first")
    windows, times = story["windows"], story["times"]
    for i0, i1 in [(0, 2), (1, 3), (2, 3)]:
        grid, w0, w1 = common.block_span(story, i0, i1, (1, 2, 3, 4), "zeros")
        k = common.block_kernel(story, grid, w0, w1, "cpu", torch.float32, 1e-10).numpy()
        f0, n = batching.window_features(story, w0, w1)
        feature_t = batching.feature_times(times, f0, n)
        # theirs is made on every TR of the story, then sliced to the block's rows
        np.testing.assert_allclose(k, lanczos_authors(feature_t, story["tr_times"])[i0:i1], atol=1e-6)
        # every feature the authors' kernel weighs for these rows is in the windows the block runs
        all_t = batching.feature_times(times, 0, len(windows))
        full = lanczos_authors(all_t, story["tr_times"])[i0:i1]
        assert np.abs(full).sum() == pytest.approx(np.abs(k).sum(), rel=1e-6)
        assert (k >= 0).all()
        unfloored = common.block_kernel(story, grid, w0, w1, "cpu", torch.float32).numpy()
        assert (unfloored < -0.01).any()


def test_instance_norm_and_zero_padded_delays_are_the_authors_readout_input():
    """norm 'instance' with history 'zeros' is the authors' preprocess_features: InstanceNorm1d
    (track_running_stats, never in eval mode) over the block's own rows, then DelayFeatures."""
    scale = torch.logspace(-3, 0.5, 16)  # features of small variance show where eps goes
    x = (torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0)) + 0.5) * scale
    norm = torch.nn.InstanceNorm1d(16, track_running_stats=True)  # theirs, in training mode
    ref = [delay_features_authors(norm(b.T).T.numpy()) for b in x]
    out = common.readout_input(x, (1, 2, 3, 4), "instance", "zeros")
    np.testing.assert_allclose(out.numpy(), np.array(ref), atol=1e-5)


def test_a_block_of_the_authors_recipe_is_their_block(model):
    """block_inputs with every authors' training choice equals their output_block_responses up to
    the readout, computed from the windows one by one: window features -> thresholded Lanczos to the
    block's own TRs -> InstanceNorm -> zero-padded delays, at blocks of unequal lengths and offsets
    in one step."""
    audio = np.random.default_rng(6).standard_normal(int(14.1 * SR)).astype(np.float32) * 0.1
    tr_times = 2.0 + 2.0 * np.arange(6)
    stories = {"s": batching.story_windows(model, torch.tensor(audio), tr_times, 3.75, 0.25, "first")}
    ref_feats, ref_t = naive_window_features(model, audio, 1, "first")
    norm = torch.nn.InstanceNorm1d(96, track_running_stats=True)
    blocks = [("s", 3, 6), ("s", 0, 3), ("s", 1, 3)]
    with torch.no_grad():
        x, order = common.block_inputs(model, stories, blocks, 1, (1, 2, 3, 4), "instance", "zeros",
                                       1e-10)
    got = dict(zip(order, x.split([blocks[j][2] - blocks[j][1] for j in order])))
    for j, (_, i0, i1) in enumerate(blocks):
        k = lanczos_authors(ref_t, tr_times)[i0:i1]  # their kernel is made on every TR, then sliced
        block = norm(torch.tensor(k @ ref_feats).T).T.numpy()
        np.testing.assert_allclose(got[j].numpy(), delay_features_authors(block), atol=2e-3)


def test_story_start_zeros_is_the_labs_make_delayed_on_zscored_rows():
    ds = np.random.default_rng(1).standard_normal((common.PAD_TRS + 30, 5)).astype(np.float32) * 2 + 3
    rows = ds[common.PAD_TRS:]
    z = (rows - rows.mean(0)) / rows.std(0)  # npp.zscore, ddof 0
    ref = delay_features_authors(z)
    np.testing.assert_allclose(common.design_matrix(ds, (1, 2, 3, 4), "zeros"), ref, atol=1e-5)
    assert not np.allclose(common.design_matrix(ds, (1, 2, 3, 4))[:4], ref[:4])  # ours reads the audio


def test_bootstrap_folds_hold_out_the_labs_chunks():
    """bootstrap_ridge: 3 draws, each holding out int(0.25 n / 40) whole chunks of 40 consecutive
    rows (chunk k is rows 40k .. 40k + 39; rows past the last whole chunk never held out), the rest
    for fitting; a seed gives the same draws."""
    n = 1013
    folds = common.bootstrap_folds(n)
    assert len(folds) == 3
    for train, held in folds:
        assert len(held) == int(0.25 * n / 40) * 40
        chunks = held.reshape(-1, 40)
        assert (chunks[:, 0] % 40 == 0).all() and (np.diff(chunks, axis=1) == 1).all()
        assert len(set(chunks[:, 0])) == len(chunks) and held.max() < n // 40 * 40
        np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(n))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, folds[1:]))
    again = common.bootstrap_folds(n)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


def ridge_lab(X, Y, alphas):
    """ridge_utils.ridge's per-voxel solution by SVD (penalty a^2 there, alpha here)."""
    U, S, Vt = np.linalg.svd(X.astype(np.float64), full_matrices=False)
    UR = U.T @ Y
    return np.stack([Vt.T @ (S / (S ** 2 + a) * UR[:, v]) for v, a in enumerate(alphas)], 1)


def test_bootstrap_ridge_picks_each_voxels_alpha_as_the_lab(tmp_path):
    """fit_ridge 'bootstrap' = the lab's bootstrap_ridge on the same draws: each alpha's held-out
    Pearson r averaged over the draws, each voxel the first best alpha (the smaller on ties: a
    constant voxel scores 0 everywhere), weights refit on every row."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((400, 12)).astype(np.float32)
    Y = (X @ rng.standard_normal((12, 6)) * [0.1, 0.3, 1, 3, 10, 0] + rng.standard_normal((400, 6)) * 3)
    Y[:, -1] = 0  # a constant voxel
    Y = Y.astype(np.float32)
    alphas = np.logspace(0, 4, 5)
    W, best, _ = common.fit_ridge(X, Y, alphas, ridge="bootstrap")
    r = np.zeros((len(alphas), Y.shape[1]))
    for train, held in common.bootstrap_folds(len(X)):
        for a, alpha in enumerate(alphas):
            pred = X[held] @ ridge_lab(X[train], Y[train], [alpha] * Y.shape[1])
            r[a] += [0.0 if pred[:, v].std() == 0 or Y[held, v].std() == 0
                     else np.corrcoef(pred[:, v], Y[held, v])[0, 1] for v in range(Y.shape[1])]
    ref_best = alphas[np.argmax(r / 3, 0)]
    np.testing.assert_allclose(best, ref_best)
    assert best[-1] == alphas[0]  # the constant voxel: the first, smallest alpha
    np.testing.assert_allclose(W, ridge_lab(X, Y, ref_best), rtol=1e-3, atol=1e-4)


def test_the_authors_epoch_choice_is_linearized_and_counts_the_untuned_model(tiny_study, tmp_path):
    """brain_best_linear.py: epoch 0 (the untuned model) is a candidate; every later epoch's
    features go through a ridge on the training stories with epoch 0's alphas, scored on the
    validation stories (mean over stories, then over voxels); the first best wins. Checked on a
    run's saved history and start, and the rule itself on made-up histories."""
    assert checkpoints.best_epoch(dict(val_r=[0.1, 0.3, 0.3], loss=[])) == 2
    assert checkpoints.best_epoch(dict(val_r=[0.1, 0.3, 0.3], loss=[], val_r_start=0.3)) == 0
    assert checkpoints.best_epoch(dict(val_r=[0.1, 0.4, 0.3], loss=[], val_r_start=0.3)) == 2
    results, ckpt = str(tmp_path / "res"), str(tmp_path / "ckpt")
    io = ["--data", tiny_study, "--results", results]
    assert run_stage("02_baseline_ridge.py", io + ["--layers", "1", "--context-s", "4", "--stride-s", "2"]) == 0
    assert run_stage("03_finetune_lora.py", io + ["--checkpoints", ckpt, "--subject", "sim01", "--epochs", "2",
                                                  "--best-epoch", "linearized", "--lr-adapter", "3e-3"]) == 0
    import glob
    out = plumbing.load_npz(glob.glob(f"{results}/03_sim01_*.npz")[0])
    history = [float(out["val_r_start"])] + list(out["val_r_by_epoch"])
    assert int(out["best_epoch"]) == int(np.argmax(history))
    # the untuned model's linearized r, recomputed: stage 02's features, its alphas on the training
    # stories alone, the lab's SVD ridge, Pearson r per validation story
    from lib.study import load_study, load_subject
    study, d = load_study(tiny_study), load_subject(tiny_study, "sim01", load_study(tiny_study))
    base = plumbing.load_npz(glob.glob(f"{results}/02_baseline_sim01*.npz")[0])
    feats = common.untuned_features(base, 1, study)
    X = np.vstack([common.design_matrix(feats[s]) for s in study["train"]])
    Y = np.vstack([d[f"resp_{s}"] for s in study["train"]])
    _, alphas, _ = common.ridge_cv(X, Y, base["alpha_grid"], n_folds=5)
    W = ridge_lab(X, Y, alphas)
    r = [[np.corrcoef(p, y)[0, 1] if p.std() > 0 and y.std() > 0 else 0.0
          for p, y in zip((common.design_matrix(feats[s]) @ W).T, d[f"resp_{s}"].T)] for s in study["val"]]
    assert float(out["val_r_start"]) == pytest.approx(np.nanmean(np.mean(r, axis=0)), abs=2e-4)
    # the last epoch's score, recomputed from its checkpoint with those same alphas
    model = checkpoints.load_tuned_wavlm(common.load_wavlm("tiny-pretrained"),
                                         glob.glob(f"{ckpt}/03_sim01_*/last/model")[0], False)
    tuned = batching.merged(model)
    feats = {s: common.story_features(tuned, None, None, f"{tiny_study}/stories/{s}.npz", 4.0, 2.0)[1]
             for s in study["train"] + study["val"]}
    W = ridge_lab(np.vstack([common.design_matrix(feats[s]) for s in study["train"]]), Y, alphas)
    r = [[np.corrcoef(p, y)[0, 1] if p.std() > 0 and y.std() > 0 else 0.0
          for p, y in zip((common.design_matrix(feats[s]) @ W).T, d[f"resp_{s}"].T)] for s in study["val"]]
    assert float(out["val_r_by_epoch"][-1]) == pytest.approx(np.nanmean(np.mean(r, axis=0)), abs=2e-4)


def test_stories_order_is_the_authors_fixed_order():
    """block_order 'stories': the training stories sorted, then shuffled once by the seed; each
    story's blocks in time order; the same order every epoch (the authors shuffle once, seed 42)."""
    blocks = [(s, i, i + 10) for s in ("b", "c", "a") for i in (20, 0, 10)]
    order = [blocks[j] for j in batching.block_order(blocks, 7, 0, "stories")]
    names = list(np.random.default_rng(7).permutation(["a", "b", "c"]))
    assert order == [(s, i, i + 10) for s in names for i in (0, 10, 20)]
    assert [blocks[j] for j in batching.block_order(blocks, 7, 5, "stories")] == order
    shuffled = [batching.block_order(blocks, 7, e) for e in (0, 1)]
    assert not np.array_equal(*shuffled)


def test_xavier_readout_weights():
    """--readout-init xavier: every weight uniform within +- sqrt(6 / (fan_in + fan_out))."""
    torch.manual_seed(0)
    r = common.make_readout(384, {"a": 50}, 100, "xavier")
    for layer, (fan_in, fan_out) in ((r["bottleneck"], (384, 100)), (r["a"], (100, 50))):
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
    default = common.make_readout(384, {"a": 50}, 100)
    assert default["a"].weight.abs().max() <= 0.1  # torch's 1 / sqrt(fan_in)


@pytest.mark.parametrize("script", ["02_baseline_ridge.py", "03_finetune_lora.py"])
def test_recipe_authors_sets_every_flag_it_names_and_a_flag_typed_wins(script):
    m = stage(script)
    args = m.get_args(["--recipe", "authors"])
    assert args.recipe == "authors"
    for k, v in m.AUTHORS.items():
        assert getattr(args, k) == v, k
    repo = m.get_args([])
    assert all(getattr(repo, k) != v for k, v in m.AUTHORS.items())  # each differs from ours
    k, v = next(iter(m.AUTHORS.items()))
    flag = "--" + k.replace("_", "-")
    other = str(getattr(repo, k))
    assert str(getattr(m.get_args(["--recipe", "authors", flag, other]), k)) == other
    assert str(getattr(m.get_args([flag, other, "--recipe", "authors"]), k)) == other
    assert plumbing.explicit_flags(m.get_parser(), ["--recipe", "authors"]) == {"recipe"}
    p = m.get_parser()  # one parser parsed again: each parse takes its own recipe's defaults
    assert plumbing.explicit_flags(p, ["--recipe", "authors"]) == {"recipe"}
    for argv, want in ((["--recipe", "authors"], m.AUTHORS), ([], vars(repo)), (["--recipe", "repo"], vars(repo))):
        again = vars(p.parse_args(argv))
        assert all(again[k] == want[k] for k in m.AUTHORS), argv


def test_a_run_of_one_recipe_refuses_the_others_stage_02_result(tiny_study, tmp_path, capsys):
    results, ckpt = str(tmp_path / "res"), str(tmp_path / "ckpt")
    io = ["--data", tiny_study, "--results", results]
    assert run_stage("02_baseline_ridge.py", io + ["--layers", "1", "--context-s", "4", "--stride-s", "2",
                                                   "--subjects", "sim01"]) == 0
    fails_cleanly("03_finetune_lora.py", io + ["--checkpoints", ckpt, "--subject", "sim01", "--recipe", "authors"],
                  capsys, "made by stage 02 --recipe repo", results, ckpt)
    assert run_stage("02_baseline_ridge.py", io + ["--layers", "1", "--subjects", "sim02", "--recipe", "authors"]) == 0
    err = fails_cleanly("03_finetune_lora.py", io + ["--checkpoints", ckpt, "--subject", "sim02"],
                        capsys, "made by stage 02 --recipe authors", results, ckpt)
    assert "--recipe authors" in err and "02_baseline_ridge.py" in err


def test_layerdrop_is_transformers_own_in_training_and_off_in_eval(audio):
    """--layerdrop p (the authors' model.train() leaves WavLM's 0.1 on): in training, transformers'
    WavLM forward skips each layer after the first when one uniform draw a layer is below p, and
    the transformers 4.33 the authors ran lists hidden states by position (a skipped layer's entry
    repeats the one before; 5.x leaves it out). The batched forward (hidden_states_from_cnn) from
    the same seed gives those states, for every pattern of skips; in eval mode no layer is
    skipped and no draw is taken."""
    m = common.load_wavlm("tiny", seed=2)  # every dropout 0: the layer draws are the only ones
    m.config.layerdrop = 0.5
    x = torch.tensor(audio[None, :4 * SR])
    patterns = set()
    with torch.no_grad():
        cnn = batching.cnn_features(m, x)
        m.train()
        for seed in range(8):
            torch.manual_seed(seed)
            skip = [False] + [bool(torch.rand([]) < 0.5) for _ in range(2)]  # the rule, drawn alone
            torch.manual_seed(seed)
            run = list(m(x, output_hidden_states=True).hidden_states)  # transformers' own forward
            expected = [run.pop(0)]
            for skipped in skip:  # 4.33's list: the state entering each layer, then the last
                expected.append(expected[-1] if skipped else run.pop(0))
            torch.manual_seed(seed)
            ours = batching.hidden_states_from_cnn(m, cnn)
            assert len(ours) == len(expected) == 4 and not run
            for a, b in zip(ours, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            patterns.add(tuple(skip))
        assert len(patterns) >= 3, patterns  # layer 2 skipped, layer 3, both or neither
        m.eval()
        torch.manual_seed(0)
        plain = batching.hidden_states_from_cnn(m, cnn)
        assert not any(torch.equal(plain[k + 1], plain[k]) for k in range(3))
        after = torch.rand([])
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand([]))  # eval took no draw


@pytest.mark.parametrize("prob", [0.05, 0.2])  # 0.05 (theirs): a 4 s window gets the 2 spans' minimum
def test_spec_augment_is_transformers_own_on_padded_windows_and_off_in_eval(audio, prob):
    """--mask-time-prob p (the authors' model.train() leaves wavlm-base-plus's 0.05 on): in training,
    frames of each window are replaced by the mask embedding in spans that transformers' own WavLM
    forward draws (numpy's global RNG, here seeded from torch's), each window's spans within its
    own frames. The batched forward over windows of two lengths gives transformers' states on every
    real frame; numpy's state is left as it was; eval neither masks nor draws."""
    m = common.load_wavlm("tiny", seed=2)  # every dropout 0: the masks are the only draws
    m.config.mask_time_prob = prob
    clips = [audio[:4 * SR], audio[SR:SR + 2 * SR + 1234]]
    n = [batching.n_frames(len(c)) for c in clips]
    x = torch.zeros(2, len(clips[0]))
    for i, c in enumerate(clips):
        x[i, :len(c)] = torch.tensor(c)
    samples = (torch.arange(x.shape[1])[None] < torch.tensor([len(c) for c in clips])[:, None]).long()
    ref = common.load_wavlm("tiny", seed=2)  # transformers' forward, SpecAugment switched on in it
    ref.config.mask_time_prob, ref.config.apply_spec_augment = prob, True
    ref.masked_spec_embed = torch.nn.Parameter(m.spec_embed.clone())
    with torch.no_grad():
        cnns = [batching.cnn_features(m, torch.tensor(c)[None])[0] for c in clips]
        m.eval()
        plain = batching.encode_windows(m, cnns, None)
        m.train(), ref.train()
        masked = 0
        for s in range(4):
            torch.manual_seed(s)
            np.random.seed(int(torch.randint(2 ** 31 - 1, ())))  # the rule: numpy seeded from torch
            expected = ref(x, attention_mask=samples, output_hidden_states=True).hidden_states
            np.random.seed(99)
            before = np.random.get_state()[1].copy()
            torch.manual_seed(s)
            ours = batching.encode_windows(m, cnns, None)
            assert np.array_equal(np.random.get_state()[1], before)  # numpy's state put back
            for a, b in zip(ours, expected):
                for i in range(2):
                    torch.testing.assert_close(a[i, :n[i]], b[i, :n[i]], rtol=1e-5, atol=1e-5)
            changed = (ours[0] != plain[0]).any(-1)
            assert changed[0].sum() >= 10 and changed[1, :n[1]].sum() >= 10  # 2 spans of 10 at least
            masked += int(changed.sum())
        assert masked < 0.6 * 4 * sum(n)  # masks, not every frame
        m.eval()
        torch.manual_seed(0)
        again = batching.encode_windows(m, cnns, None)
        after = torch.rand([])
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand([]))  # eval took no draw
        for a, b in zip(again, plain):
            assert torch.equal(a, b)


def test_the_mask_embedding_is_the_checkpoints_and_outside_the_fingerprint(tmp_path):
    """load_wavlm keeps a checkpoint's masked_spec_embed (the one SpecAugment fills with) beside the
    weights, not among them: the model's fingerprint, which stages 02-05 check, is that of the same
    weights without it; a model without one gets a seeded draw."""
    from transformers import WavLMModel
    cfg = common.tiny_config()
    cfg.mask_time_prob = 0.05
    torch.manual_seed(5)
    saved = WavLMModel(cfg)
    torch.nn.init.normal_(saved.masked_spec_embed)  # not U(0, 1): a draw could not match it
    saved.save_pretrained(tmp_path / "with")
    cfg.mask_time_prob = 0.0
    plain = WavLMModel(cfg)
    plain.load_state_dict({k: v for k, v in saved.state_dict().items() if k != "masked_spec_embed"})
    plain.save_pretrained(tmp_path / "without")
    cfg.mask_time_prob = 0.05  # masking on in its config, the embedding missing from its weights
    WavLMModel(cfg).save_pretrained(tmp_path / "lost", state_dict=plain.state_dict())
    a, b = common.load_wavlm(str(tmp_path / "with")), common.load_wavlm(str(tmp_path / "without"))
    assert torch.equal(a.spec_embed, saved.masked_spec_embed.detach())
    assert "masked_spec_embed" not in a.state_dict() and "spec_embed" not in a.state_dict()
    assert plumbing.model_fingerprint(a) == plumbing.model_fingerprint(b)
    assert "spec_embed" in dict(a.named_buffers())  # moves with the model (.to(device))
    assert a.to(torch.float64).spec_embed.dtype == torch.float64
    draw = torch.rand(cfg.hidden_size, generator=torch.Generator().manual_seed(0))  # WavLM's U(0, 1)
    assert torch.equal(b.spec_embed, draw) and not torch.equal(b.spec_embed, a.spec_embed)
    assert torch.equal(common.load_wavlm(str(tmp_path / "lost")).spec_embed, draw)
    assert not torch.equal(b.spec_embed, common.load_wavlm(str(tmp_path / "without"), seed=1).spec_embed)
    assert torch.equal(common.load_wavlm("tiny", seed=0).spec_embed, draw)


def test_masking_and_layerdrop_reach_the_trained_model_and_never_the_validation(tiny_study, tmp_path):
    """--mask-time-prob and --layerdrop (the authors' 0.05 and 0.1; ours 0) reach the model stage 03
    trains, each its own value; the validation r that picks the best epoch is the eval-mode model's,
    which neither masks nor skips (in training mode the same predictions differ)."""
    m = stage("03_finetune_lora.py")
    assert (m.AUTHORS["mask_time_prob"], m.AUTHORS["layerdrop"]) == (0.05, 0.1)  # wavlm-base-plus's
    assert (m.get_args([]).mask_time_prob, m.get_args([]).layerdrop) == (0.0, 0.0)
    args = m.get_args(["--epochs", "1", "--block-trs", "10", "--mask-time-prob", "0.3", "--layerdrop",
                       "0.2", "--bottleneck", "20", "--lr-adapter", "3e-3", "--device", "cpu"])
    layer, delays, d = 2, (1, 2), plumbing.load_npz(f"{tiny_study}/subjects/sim01.npz")
    baseline = dict(model=np.array("tiny"), model_seed=np.int64(0), provenance=dict(stories="s"),
                    delays=np.array(delays))
    model, readout, opt, prov, _ = m.setup_model(args, baseline, 0, {"sim01": len(d["roi_AC"])}, "cpu")
    config = batching.base_wavlm(model).config
    assert (config.mask_time_prob, config.layerdrop) == (0.3, 0.2)
    stories = batching.load_stories(model, tiny_study, ["story00", "val00"], "cpu", 0.0, 4.0)
    resp, val = {"sim01": {"story00": torch.tensor(d["resp_story00"])}}, d["resp_val00"]
    run = dict(name="masked", ckpt=str(tmp_path / "ckpt"), prov=prov)
    history = m.train(args, run, model, readout, opt, stories, resp, {"sim01": {"val00": val}},
                      layer, 0, delays)

    def val_r():
        with torch.no_grad():
            preds = common.predict_story(model, readout, stories["val00"], layer, args.block_trs, delays)
        return float(common.pearson_r(val, preds["sim01"]).mean())
    model.eval()
    assert history["val_r"] == [pytest.approx(val_r(), abs=1e-6)]
    model.train()
    torch.manual_seed(1)
    assert abs(val_r() - history["val_r"][0]) > 1e-4
