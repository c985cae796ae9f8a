"""Stage 03: the loss, the differentiable pieces, LoRA training, resume, ROI and bad flags."""
import os

import numpy as np
import pytest
import torch

import common
from conftest import load_stage, run_stage

STAGE = "03_finetune_lora.py"
FAST = ["--epochs", "2", "--block-trs", "16", "--lora-rank", "4", "--lr-adapter", "3e-3", "--lr-readout", "1e-3",
        "--lora-targets", "q_proj", "k_proj", "v_proj", "out_proj"]
GRID = ["--alphas", "3", "3000", "--n-folds", "4"]  # not the defaults: stage 03 must score with these


def test_spatial_corr_loss_is_minus_one_for_perfect_and_scale_blind():
    m = load_stage(STAGE)
    y = torch.randn(10, 50)
    assert torch.isclose(m.spatial_corr_loss(y.clone(), y), torch.tensor(-1.0), atol=1e-5)
    scale = torch.rand(10, 1) * 5 + 0.1
    assert torch.isclose(m.spatial_corr_loss(y * scale + 3.0, y), torch.tensor(-1.0), atol=1e-5)
    assert torch.isclose(m.spatial_corr_loss(-y, y), torch.tensor(1.0), atol=1e-5)
    assert abs(m.spatial_corr_loss(torch.randn(200, 500), torch.randn(200, 500)).item()) < 0.02


def test_lora_changes_after_a_step_and_loss_falls_on_a_fixed_batch(tiny_study):
    m = load_stage(STAGE)
    args = m.get_args(FAST)
    torch.manual_seed(0)
    model = common.add_lora(common.load_wavlm("tiny"), 4, 4, 0.0, args.lora_targets).train()
    st = common.load_npz(f"{tiny_study}/stories/story00.npz")
    story = dict(audio=torch.tensor(st["audio"]), tr_times=st["tr_times"])
    y = torch.tensor(common.load_npz(f"{tiny_study}/subjects/sim01.npz")["resp_story00"][:16])
    readout = m.make_readout(96 * 4, y.shape[1], 20)
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 3e-3},
                            {"params": readout.parameters(), "lr": 1e-3}])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = m.spatial_corr_loss(m.predict_block(model, readout, story, 0, 16, 3, args), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), n


def test_predict_block_matches_whole_story_features(tiny_study):
    """The block's differentiable path (torch Lanczos on a segment) equals the numpy recipe on the
    whole story, for rows away from the segment edges."""
    m = load_stage(STAGE)
    args = m.get_args(FAST + ["--train-context-s", "0", "--train-stride-s", "4"])
    model = common.load_wavlm("tiny")
    st = common.load_npz(f"{tiny_study}/stories/story01.npz")
    story = dict(audio=torch.tensor(st["audio"]), tr_times=st["tr_times"])
    ident = torch.nn.Identity()
    with torch.no_grad():
        block = m.predict_block(model, ident, story, 4, 12, 1, args, delays=(1,)).numpy()
    f, t = common.extract_features(model, st["audio"], layers=[1], context_s=0.0, stride_s=4.0)
    grid = st["tr_times"][0] + 2.0 * np.arange(3, 12)
    ref = common.lanczos_interp(f[0], t, grid)
    ref = (ref - ref.mean(0)) / (ref.std(0, ddof=1) + 1e-5)
    np.testing.assert_allclose(block, ref[:-1], atol=2e-3)


def test_block_features_from_the_story_cnn_equal_running_the_cnn_on_the_block(tiny_study):
    """Stage 03 runs the frozen CNN once per story and slices it for each block; that must be
    exactly what the CNN gives for the block's own audio (blocks with past context, mid-story)."""
    m = load_stage(STAGE)
    args = m.get_args(FAST + ["--train-context-s", "4", "--train-stride-s", "2"])
    model = common.load_wavlm("tiny")
    story = m.load_stories(model, tiny_study, ["story01"], "cpu")["story01"]
    assert story["cnn"].shape == (common.n_frames(len(story["audio"])), model.config.conv_dim[-1])
    plain = dict(audio=story["audio"], tr_times=story["tr_times"])
    with torch.no_grad():
        for i0, i1 in [(0, 8), (9, 17), (len(story["tr_times"]) - 6, len(story["tr_times"]))]:
            fast, t_fast, _ = m.block_features(model, story, i0, i1, 2, args, grad=False)
            ref, t_ref, _ = m.block_features(model, plain, i0, i1, 2, args, grad=False)
            np.testing.assert_array_equal(t_fast, t_ref)
            np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-5)
    with pytest.raises(common.StudyError, match="precomputed CNN"):
        common.extract_features(model, story["audio"][:32000], cnn=story["cnn"][:10])
    # a group-norm CNN (wavlm-base-plus) normalises over its input: no story-wide output to reuse
    from transformers import WavLMModel
    cfg = common.tiny_config()
    cfg.feat_extract_norm = "group"
    assert common.story_cnn(WavLMModel(cfg), story["audio"]) is None


def test_story_cnn_cache_reads_back_exactly_and_is_keyed_by_weights_and_audio(tiny_study, tmp_path, monkeypatch):
    """The CNN cache every stage shares: a hit returns the very numbers a fresh pass gives, without
    running the CNN; other audio under the same story name, or another model's CNN, is not served."""
    import glob
    model = common.load_wavlm("tiny")
    audio = common.load_npz(f"{tiny_study}/stories/story01.npz")["audio"]
    fresh = common.story_cnn(model, audio)
    assert torch.equal(common.story_cnn(model, audio, str(tmp_path), "story01"), fresh)
    assert len(glob.glob(f"{tmp_path}/features/cnn-*/story01.npz")) == 1
    calls, real = [], common.cnn_features
    monkeypatch.setattr(common, "cnn_features", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(common.story_cnn(model, audio, str(tmp_path), "story01"), fresh) and calls == []
    shifted = np.roll(audio, 1000)
    assert torch.equal(common.story_cnn(model, shifted, str(tmp_path), "story01"), common.story_cnn(model, shifted))
    assert len(calls) == 2  # one pass per call (a 60 s story is one chunk): the file of the other audio was not served
    common.story_cnn(common.load_wavlm("tiny", seed=1), audio, str(tmp_path), "story01")
    assert len(glob.glob(f"{tmp_path}/features/cnn-*/story01.npz")) == 2


@pytest.fixture(scope="module")
def trained(tiny_study, tmp_path_factory):
    base = tmp_path_factory.mktemp("ft")
    results, ckpt = str(base / "results"), str(base / "ckpt")
    assert run_stage("02_baseline_ridge.py", ["--data", tiny_study, "--results", results, "--layers", "1",
                                              "--subjects", "sim01", "--context-s", "4", "--stride-s", "2",
                                              "--refresh-features"] + GRID) == 0
    assert run_stage(STAGE, ["--data", tiny_study, "--results", results, "--checkpoints", ckpt,
                             "--subject", "sim01"] + FAST) == 0
    return tiny_study, results, ckpt


def test_run_writes_results_and_peft_checkpoints(trained):
    data, results, ckpt = trained
    out = common.load_npz(f"{results}/03_sim01_whole_lora_seed0.npz")
    n_vox = len(out["test_r_baseline"])
    for k in ("test_r_tuned", "test_r_direct"):
        assert out[k].shape == (n_vox,) and np.all(np.isfinite(out[k]))
    assert out["val_r_by_epoch"].shape == (2,) and 1 <= int(out["best_epoch"]) <= 2
    assert int(out["layer"]) == 1
    # the tuned features are scored with stage 02's own ridge search, not the default grid
    base = common.load_npz(f"{results}/02_baseline_sim01.npz")
    assert list(base["alpha_grid"]) == [3.0, 3000.0] and int(base["n_folds"]) == 4
    assert set(np.unique(out["alphas_tuned"])) <= {3.0, 3000.0}
    run = f"{ckpt}/03_sim01_whole_lora_seed0"
    assert os.path.exists(f"{run}/best/model/adapter_config.json")
    assert os.path.exists(f"{run}/best/model/adapter_model.safetensors")
    # anyone with peft can load the adapter
    from peft import PeftModel
    model = PeftModel.from_pretrained(common.load_wavlm("tiny"), f"{run}/best/model")
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert os.path.exists(f"{results}/03_sim01_whole_lora_seed0.png")


def test_resume_equals_uninterrupted(trained, tmp_path):
    data, results, _ = trained
    ckpt = str(tmp_path / "ckpt")
    res2 = str(tmp_path / "res")
    os.makedirs(res2)
    import shutil
    shutil.copy(f"{results}/02_baseline_sim01.npz", res2)
    common_args = ["--data", data, "--results", res2, "--checkpoints", ckpt, "--subject", "sim01"]
    assert run_stage(STAGE, common_args + FAST[:1] + ["1"] + FAST[2:]) == 0  # "killed" after epoch 1
    assert run_stage(STAGE, common_args + FAST + ["--resume"]) == 0
    a = common.load_npz(f"{results}/03_sim01_whole_lora_seed0.npz")
    b = common.load_npz(f"{res2}/03_sim01_whole_lora_seed0.npz")
    np.testing.assert_allclose(b["val_r_by_epoch"], a["val_r_by_epoch"], atol=1e-6)
    np.testing.assert_allclose(b["test_r_tuned"], a["test_r_tuned"], atol=1e-5)


def test_roi_restricts_the_readout(trained, tmp_path):
    data, results, _ = trained
    ckpt = str(tmp_path / "ckpt")
    assert run_stage(STAGE, ["--data", data, "--results", results, "--checkpoints", ckpt, "--subject", "sim01",
                             "--roi", "AC"] + FAST[:1] + ["1"] + FAST[2:]) == 0
    out = common.load_npz(f"{results}/03_sim01_AC_lora_seed0.npz")
    ac = common.load_npz(f"{data}/subjects/sim01.npz")["roi_AC"]
    np.testing.assert_array_equal(out["roi_mask"], ac)
    assert np.all(np.isnan(out["test_r_direct"][~ac])) and np.all(np.isfinite(out["test_r_direct"][ac]))
    state = torch.load(f"{ckpt}/03_sim01_AC_lora_seed0/best/state.pt", weights_only=True)
    assert state["readout"]["1.weight"].shape[0] == ac.sum()


def test_bad_flags(trained, tmp_path, capsys):
    data, results, _ = trained
    base = ["--data", data, "--results", results, "--checkpoints", str(tmp_path)]
    assert run_stage(STAGE, base + ["--roi", "V1"]) == 1
    assert "unknown ROI" in capsys.readouterr().err
    assert run_stage(STAGE, ["--data", data, "--results", str(tmp_path / "none"), "--subject", "sim01"]) == 1
    assert "02_baseline_ridge.py" in capsys.readouterr().err
    empty = tmp_path / "d"
    import shutil
    shutil.copytree(data, empty, ignore=shutil.ignore_patterns("features"))
    d = common.load_npz(empty / "subjects" / "sim01.npz")
    d["roi_AC"] = np.zeros_like(d["roi_AC"])
    common.save_npz(empty / "subjects" / "sim01.npz", **d)
    assert run_stage(STAGE, ["--data", str(empty), "--results", results, "--checkpoints", str(tmp_path),
                             "--subject", "sim01", "--roi", "AC"]) == 1
    assert "mask of sim01 is empty" in capsys.readouterr().err


@pytest.mark.parametrize("flags, msg", [
    (["--block-trs", "0"], "--block-trs 0 is out of range: it must be >= 1"),
    (["--epochs", "0"], "--epochs 0 is out of range"),
    (["--lora-targets", "q_proj", "nonexistent"], "--lora-targets nonexistent: not a linear layer"),
    (["--train-stride-s", "0.03"], "--train-stride-s 0.03 must be a positive multiple of WavLM's 20 ms frame"),
])
def test_bad_ranges_are_one_line_and_write_nothing(trained, tmp_path, capsys, flags, msg):
    data, results, _ = trained
    out, ckpt = str(tmp_path / "r"), str(tmp_path / "c")
    import shutil
    shutil.copytree(results, out)
    before = sorted(os.listdir(out))
    capsys.readouterr()
    assert run_stage(STAGE, ["--data", data, "--results", out, "--checkpoints", ckpt, "--subject", "sim01"] + flags) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and msg in err, err
    assert sorted(os.listdir(out)) == before and not os.path.exists(ckpt)
    if "nonexistent" in flags:  # the message lists what can be adapted
        assert all(name in err for name in ("q_proj", "out_proj", "intermediate_dense", "projection"))


# --------------------------------------------------------------------------- --init-from

def _features(model, tiny_study):
    audio = common.load_npz(f"{tiny_study}/stories/story00.npz")["audio"][:16000 * 20]
    return common.extract_features(model, audio, layers=[1, 2], context_s=4.0, stride_s=2.0)[0]


@pytest.mark.parametrize("full", [False, True])
def test_init_from_starts_exactly_at_the_checkpoint(trained, tmp_path, full):
    data, results, ckpt = trained
    m = load_stage(STAGE)
    mode = ["--full-finetune"] if full else []
    if full:  # a full fine-tuning checkpoint to start from
        ckpt = str(tmp_path / "ckpt")
        import shutil
        shutil.copytree(results, tmp_path / "r")
        assert run_stage(STAGE, ["--data", data, "--results", str(tmp_path / "r"), "--checkpoints", ckpt,
                                 "--subject", "sim01", "--epochs", "1", "--block-trs", "16"] + mode) == 0
    source = f"{ckpt}/03_sim01_whole_{'full' if full else 'lora'}_seed0"
    baseline = common.load_npz(f"{results}/02_baseline_sim01.npz")
    args = m.get_args(["--roi", "AC", "--init-from", source] + FAST + mode)
    model, readout, _, origin, init = m.setup_model(args, baseline, 1, 7, "cpu")
    model.eval()  # new LoRA dropout modules start in train mode; compare without dropout
    assert init == (f"{source}/best", f"sim01_whole_{origin['mode']}_seed0") and readout[1].out_features == 7
    ref = common.load_tuned_wavlm(baseline, f"{source}/best/model", full=full)
    plain = common.load_wavlm(str(baseline["model"]), int(baseline["model_seed"]))
    ours, theirs, base = _features(model, data), _features(ref, data), _features(plain, data)
    for a, b, c in zip(ours, theirs, base):
        np.testing.assert_array_equal(a, b)  # the first forward pass is the checkpoint's
        assert not np.allclose(a, c, atol=1e-4)  # and not the untuned model's


def test_init_from_run_is_named_and_recorded_and_read_by_stages_04_and_05(trained, tmp_path):
    data, results, ckpt = trained
    out = str(tmp_path / "r")
    import shutil
    shutil.copytree(results, out)
    source = f"{ckpt}/03_sim01_whole_lora_seed0"
    assert run_stage(STAGE, ["--data", data, "--results", out, "--checkpoints", ckpt, "--subject", "sim01",
                             "--roi", "AC", "--init-from", source] + FAST[:1] + ["1"] + FAST[2:]) == 0
    name = "03_sim01_AC_lora_seed0_from_sim01_whole_lora_seed0"
    res = common.load_npz(f"{out}/{name}.npz")
    assert str(res["init_from"]) == f"{source}/best" and str(res["roi"]) == "AC"
    assert os.path.isdir(f"{ckpt}/{name}/best/model")
    assert str(common.load_npz(f"{out}/03_sim01_whole_lora_seed0.npz")["init_from"]) == ""
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", out, "--checkpoints", ckpt, "--roi", "AC",
                                             "--tuned-on", "sim01", "--evaluate-on", "sim01",
                                             "--init-from", "sim01_whole_lora_seed0"]) == 0
    cross = common.load_npz(f"{out}/04_cross_subject.npz")
    np.testing.assert_allclose(cross["test_r_sim01_on_sim01"], res["test_r_tuned"], atol=1e-5)


def test_init_from_refuses_checkpoints_that_do_not_fit(trained, tmp_path):
    data, results, ckpt = trained
    m = load_stage(STAGE)
    source = f"{ckpt}/03_sim01_whole_lora_seed0"
    baseline = common.load_npz(f"{results}/02_baseline_sim01.npz")

    def refused(flags, base=baseline):
        with pytest.raises(common.StudyError) as e:
            m.setup_model(m.get_args(["--roi", "AC"] + FAST + flags), base, 0, 5, "cpu")
        return str(e.value)
    assert "is a lora checkpoint; this run is full" in refused(["--init-from", source, "--full-finetune"])
    assert "another LoRA shape" in refused(["--init-from", source, "--lora-rank", "8"])
    assert "another LoRA shape" in refused(["--init-from", source, "--lora-targets", "q_proj", "v_proj"])
    other = dict(baseline, model=np.array("tiny"))  # the random model, not the pretrained one
    assert "another base model (tiny-pretrained, seed 0) than stage 02's (tiny, seed 0)" in refused(["--init-from", source], other)
    assert "no stage 03 checkpoint there" in refused(["--init-from", str(tmp_path)])
    old = tmp_path / "old"  # a checkpoint written before origins were recorded
    import shutil
    shutil.copytree(f"{source}/best", old)
    state = torch.load(old / "state.pt", weights_only=True)
    del state["origin"]
    torch.save(state, old / "state.pt")
    assert "predates --init-from" in refused(["--init-from", str(old)])
