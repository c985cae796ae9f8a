"""Stage 03: the loss, the differentiable pieces, LoRA training, resume, ROI and bad flags."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import common
from lib import batching, checkpoints, plumbing, provenance
from helpers import as_a_fresh_process, ctrl_c_after_each_epoch, fails_cleanly, fresh_results, one, run_stage, stage
from lib.study import load_study

STAGE = "03_finetune_lora.py"
FAST = ["--epochs", "2", "--block-trs", "16", "--lora-rank", "4", "--lr-adapter", "3e-3", "--lr-readout", "1e-3",
        "--lora-targets", "q_proj", "k_proj", "v_proj", "out_proj"]
GRID = ["--alphas", "3", "3000", "--n-folds", "4"]  # not the defaults: stage 03 must score with these


def test_spatial_corr_loss_is_minus_one_for_perfect_and_scale_blind():
    y = torch.randn(10, 50)
    assert torch.isclose(common.spatial_corr_loss(y.clone(), y), torch.tensor(-1.0), atol=1e-5)
    scale = torch.rand(10, 1) * 5 + 0.1
    assert torch.isclose(common.spatial_corr_loss(y * scale + 3.0, y), torch.tensor(-1.0), atol=1e-5)
    assert torch.isclose(common.spatial_corr_loss(-y, y), torch.tensor(1.0), atol=1e-5)
    assert abs(common.spatial_corr_loss(torch.randn(200, 500), torch.randn(200, 500)).item()) < 0.02


def test_lora_changes_after_a_step_and_loss_falls_on_a_fixed_batch(tiny_study):
    torch.manual_seed(0)
    model = common.add_lora(common.load_wavlm("tiny"), 4, 4, 0.0, ["q_proj", "k_proj", "v_proj", "out_proj"]).train()
    stories = batching.load_stories(model, tiny_study, ["story00"], "cpu")
    y = torch.tensor(plumbing.load_npz(f"{tiny_study}/subjects/sim01.npz")["resp_story00"][:16])
    readout = common.make_readout(96 * 4, {"s": y.shape[1]}, 20)
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 3e-3},
                            {"params": readout.parameters(), "lr": 1e-3}])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    losses = []
    for _ in range(15):
        opt.zero_grad()
        x, _ = common.block_inputs(model, stories, [("story00", 0, 16)], 3)
        loss = common.blocks_loss(common.read_out(readout, x)["s"], y, [16])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), n


def test_one_batched_step_has_the_gradients_of_its_blocks_one_by_one(tiny_study):
    """The paper's step (the batched step, 1a7be3b): all of a step's blocks in one forward and one backward give the
    gradients of the per-block path (each block forward and backward on its own, its loss divided
    by the blocks per step) to float tolerance. The blocks come from two stories, two of one length
    and two of others, the equal ones not side by side: block_inputs then groups the blocks and
    hands back another order than the one asked for, and a group holds two blocks, each normalised
    on its own. A story's short last block needs the story's padded last window."""
    torch.manual_seed(0)
    model = common.add_lora(common.load_wavlm("tiny"), 4, 4, 0.0, ["q_proj", "k_proj", "v_proj"]).train()
    for n, p in model.named_parameters():
        if "lora_B" in n:  # as after some training: lora_B starts at zero, which gives lora_A no gradient
            p.data.normal_(0, 0.1)
    stories = batching.load_stories(model, tiny_study, ["story00", "story01"], "cpu", 2.0, 2.0)
    d = plumbing.load_npz(f"{tiny_study}/subjects/sim01.npz")
    resp = {s: torch.tensor(d[f"resp_{s}"]) for s in stories}
    rows = len(stories["story01"]["tr_times"])
    blocks = [("story00", 4, 20), ("story01", rows - 5, rows), ("story01", 1, 17), ("story00", 16, 25)]
    readout = common.make_readout(96 * 4, {"s": resp["story00"].shape[1]}, 20)
    params = [p for p in model.parameters() if p.requires_grad] + list(readout.parameters())

    def grads(batches):
        for p in params:
            p.grad = None
        total, orders = 0.0, []
        for batch in batches:
            x, order = common.block_inputs(model, stories, batch, 3)
            orders.append(order)
            batch = [batch[j] for j in order]
            loss = common.blocks_loss(common.read_out(readout, x)["s"], torch.cat([resp[s][a:b] for s, a, b in batch]),
                                      [b - a for _, a, b in batch])
            (loss / len(blocks)).backward()
            total += loss.item()
        return total, [p.grad.clone() for p in params], orders

    one_loss, one, (order,) = grads([blocks])
    each_loss, each, _ = grads([[b] for b in blocks])
    assert abs(one_loss - each_loss) < 1e-5
    assert all(g.abs().sum() > 0 for g in one)  # every trainable tensor took part
    for a, b in zip(one, each):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert sorted(order) == list(range(len(blocks))) and order != sorted(order)  # regrouped: the case that can go wrong
    # and the pieces compose as the paper's loss: each block's spatial correlation loss, summed
    x, _ = common.block_inputs(model, stories, blocks[:1], 3)
    with torch.no_grad():
        pred = common.read_out(readout, x)["s"]
        assert abs(common.spatial_corr_loss(pred, resp["story00"][4:20]).item()
                   - common.blocks_loss(pred, resp["story00"][4:20], [16]).item()) < 1e-6


@pytest.mark.parametrize("context_s,stride_s,norm", [(0.0, 4.0, "layer"), (4.0, 2.0, "layer"), (4.0, 2.0, "group")])
def test_block_inputs_are_the_whole_story_recipe_at_its_rows(tiny_study, monkeypatch, context_s, stride_s, norm):
    """A block's differentiable path (the windows it needs, torch Lanczos to its grid, norm, delays)
    equals the numpy recipe on the whole story's features at the block's rows, for a frame-local
    and a group-norm CNN: at the story's start, middle and end, and with windows every 4 s (the
    TR is 2 s) for a block starting at every row of the story (the last ones shorter). There blocks
    of one shape sit at two offsets from their first frame: the Lanczos kernels, cached by shape
    and offset (from empty here, built by whichever block comes first), must tell them apart."""
    monkeypatch.setattr(common, "_KERNELS", {})
    cfg = common.tiny_config()
    cfg.feat_extract_norm = norm
    model = common.load_wavlm("tiny", config=cfg)
    stories = batching.load_stories(model, tiny_study, ["story01"], "cpu", context_s, stride_s)
    st = stories["story01"]
    f, t = common.extract_features(model, st["audio"], layers=[1], context_s=context_s, stride_s=stride_s)
    rows, offsets = len(st["tr_times"]), {}
    for i0 in range(rows) if stride_s == 4.0 else [0, 4, rows - 6]:
        i1 = min(rows, i0 + 8)
        with torch.no_grad():
            block, _ = common.block_inputs(model, stories, [("story01", i0, i1)], 1, delays=(1, 2))
        grid = st["tr_times"][0] + 2.0 * np.arange(i0 - 2, i1)
        ref = common.lanczos_interp(f[0], t, grid)
        ref = (ref - ref.mean(0)) / (ref.std(0, ddof=1) + 1e-5)
        ref = common.make_delayed(ref, (1, 2))[2:]
        np.testing.assert_allclose(block.numpy(), ref, atol=1e-4, err_msg=f"block {i0}..{i1}")
        _, w0, w1 = common.block_span(st, i0, i1, (1, 2))
        f0, n = batching.window_features(st, w0, w1)
        offsets.setdefault((i1 - i0, n), set()).add(round(grid[0] - batching.feature_times(batching.FRAMES, f0, 1)[0], 6))
    if stride_s == 4.0:  # the case a kernel keyed without its offset gets wrong
        assert max(len(o) for o in offsets.values()) > 1, offsets


def test_features_and_predictions_over_several_forwards_are_those_of_one(tiny_study, monkeypatch):
    """On a GPU the memory budget splits a story's windows (and predict_story's blocks) over several
    forwards; on a CPU's 1 GB the tiny model takes them all in one, so the tests never split them.
    Forced to 3 windows a forward: extract_features gives the same features frame for frame (the
    windows of a batch of unequal lengths at the start and end), and predict_story, a block a
    forward, the same predictions, the story's short last block included."""
    model = common.load_wavlm("tiny")
    st = batching.load_stories(model, tiny_study, ["story01"], "cpu", 0.0, 4.0)["story01"]
    readout = common.make_readout(96 * 2, {"a": 7, "b": 5}, 8)
    audio, kw = st["audio"][:16000 * 20], dict(layers=[1, 3], context_s=2.0, stride_s=1.0)
    whole, _ = common.extract_features(model, audio, **kw)
    once = common.predict_story(model, readout, st, 2, 8, delays=(1, 2))
    monkeypatch.setattr(common, "windows_per_batch", lambda *a, **k: 3)
    split, _ = common.extract_features(model, audio, **kw)
    for a, b in zip(whole, split):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert len(st["tr_times"]) % 8  # a short last block
    for s, pred in common.predict_story(model, readout, st, 2, 8, delays=(1, 2)).items():
        assert pred.shape == (len(st["tr_times"]), readout[s].out_features)
        np.testing.assert_allclose(pred, once[s], atol=1e-5)


def test_window_cnn_is_the_cnn_of_each_window_s_own_audio(tiny_study):
    """Stage 03 runs the frozen CNN once (per story for a frame-local CNN, sliced per window; per
    window for a group-norm one) and keeps it for every epoch: that must be exactly what the CNN
    gives for each window's own audio (windows with past context, mid-story, the story's last; and
    the authors' windows every 0.25 s, which start between two of the story's frames)."""
    from transformers import WavLMModel
    audio = torch.tensor(plumbing.load_npz(f"{tiny_study}/stories/story01.npz")["audio"])
    for norm in ("layer", "group"):
        cfg = common.tiny_config()
        cfg.feat_extract_norm = norm
        model = common.load_wavlm("tiny", config=cfg)
        for windows in (batching.feature_windows(len(audio), 4.0, 2.0)[0],
                        batching.feature_windows(len(audio), 3.75, 0.25, "first")[0]):
            kept = batching.window_cnn(model, audio, windows)
            for w in (0, 3, 17, 18, len(windows) // 2, len(windows) - 1):
                a, b = windows[w][:2]
                own = batching.cnn_features(model, audio[None, a:b])[0]
                torch.testing.assert_close(kept[w], own, rtol=1e-5, atol=1e-5)
    with pytest.raises(plumbing.StudyError, match="precomputed CNN"):
        common.extract_features(common.load_wavlm("tiny"), audio[:32000], cnn=kept[0][:10])
    # a group-norm CNN (wavlm-base-plus) normalises over its input: no story-wide output to reuse
    assert batching.story_cnn(WavLMModel(cfg), audio) is None


def test_story_cnn_cache_reads_back_exactly_and_is_keyed_by_weights_and_audio(tiny_study, tmp_path, monkeypatch):
    """The CNN cache every stage shares: a hit returns the very numbers a fresh pass gives, without
    running the CNN; other audio under the same story name, or another model's CNN, is not served."""
    import glob
    model = common.load_wavlm("tiny")
    audio = plumbing.load_npz(f"{tiny_study}/stories/story01.npz")["audio"]
    fresh = batching.story_cnn(model, audio)
    assert torch.equal(batching.story_cnn(model, audio, str(tmp_path), "story01"), fresh)
    assert len(glob.glob(f"{tmp_path}/features/cnn-*/story01.npz")) == 1
    calls, real = [], batching.cnn_features
    monkeypatch.setattr(batching, "cnn_features", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(batching.story_cnn(model, audio, str(tmp_path), "story01"), fresh) and calls == []
    shifted = np.roll(audio, 1000)
    assert torch.equal(batching.story_cnn(model, shifted, str(tmp_path), "story01"), batching.story_cnn(model, shifted))
    assert len(calls) == 2  # one pass per call (a 60 s story is one chunk): the file of the other audio was not served
    batching.story_cnn(common.load_wavlm("tiny", seed=1), audio, str(tmp_path), "story01")
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
    out = plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
    n_vox = len(out["test_r_baseline"])
    for k in ("test_r_tuned", "test_r_direct"):
        assert out[k].shape == (n_vox,) and np.all(np.isfinite(out[k]))
    assert out["val_r_by_epoch"].shape == (2,) and 1 <= int(out["best_epoch"]) <= 2
    assert int(out["layer"]) == 1
    # the tuned features are scored with stage 02's own ridge search, not the default grid
    base = plumbing.load_npz(one(f"{results}/02_baseline_sim01_*.npz"))
    assert list(base["alpha_grid"]) == [3.0, 3000.0] and int(base["n_folds"]) == 4
    assert set(np.unique(out["alphas_tuned"])) <= {3.0, 3000.0}
    # the run records what it was built from: the study, the subject file, the stage 02 result
    prov = json.loads(str(out["provenance"]))
    study = load_study(data)
    assert prov["stories"] == study["stories_fingerprint"] and prov["subject_data"] == study["subject_fingerprints"]["sim01"]
    assert prov["baseline"]["fingerprint"] == provenance.digest(json.loads(str(base["provenance"])))
    assert json.loads(str(out["settings"]))["lr_adapter"] == 3e-3 and str(out["fingerprint"]) == provenance.digest(prov)
    run = one(f"{ckpt}/03_sim01_whole_lora_seed0_*")
    assert os.path.exists(f"{run}/best/model/adapter_config.json")
    assert os.path.exists(f"{run}/best/model/adapter_model.safetensors")
    # anyone with peft can load the adapter
    from peft import PeftModel
    model = PeftModel.from_pretrained(common.load_wavlm("tiny"), f"{run}/best/model")
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert os.path.exists(one(f"{results}/03_sim01_whole_lora_seed0_*.png"))


def _same_result(a, b):
    a, b = plumbing.load_npz(one(f"{a}/03_*.npz")), plumbing.load_npz(one(f"{b}/03_*.npz"))
    np.testing.assert_allclose(b["val_r_by_epoch"], a["val_r_by_epoch"], atol=1e-6)
    np.testing.assert_allclose(b["test_r_tuned"], a["test_r_tuned"], atol=1e-5)
    assert str(a["fingerprint"]) == str(b["fingerprint"])


def test_an_edit_to_stage_03_is_a_run_of_its_own_and_compare_names_it(trained, tmp_path, capsys):
    """A student's code edit (an L2 penalty on the readout, after the loss) in a git checkout, run with
    the same flags: the run gets a name of its own (never the reference's), records the edited file,
    and compare.py reports the code change with a difference paired by seed."""
    import subprocess
    from helpers import ROOT
    if shutil.which("git") is None:
        pytest.skip("needs git: the edit is told from the commit")
    data, results, _ = trained
    repo, mine = tmp_path / "repo", tmp_path / "mine"
    shutil.copytree(ROOT, repo, ignore=lambda d, names: [n for n in names if n in {
        ".git", ".venv", "data", "results", "checkpoints", "experiments", "tests", "bench", "docs", "figures",
        "__pycache__"} or n.startswith(("data.", "results_"))])
    git = ["git", "-c", "user.name=student", "-c", "user.email=student@example.org"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "as cloned"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    loss_line = "                           for subj in resp) / len(resp)  # the mean over a joint run's subjects\n"
    code = open(repo / STAGE).read()
    assert loss_line in code
    open(repo / STAGE, "w").write(code.replace(loss_line, loss_line + "                loss = loss + 1e-2 * sum("
                                                  "p_.pow(2).sum() for p_ in readout.parameters())\n"))
    os.makedirs(mine)
    for f in os.listdir(results):
        if f.startswith("02_baseline_sim01"):
            shutil.copy(os.path.join(results, f), mine)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, STAGE, "--data", data, "--results", str(mine), "--checkpoints",
                           str(tmp_path / "ckpt"), "--subject", "sim01"] + FAST, cwd=repo, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reference, edited = one(f"{results}/03_sim01_whole_lora_seed0_*.npz"), one(f"{mine}/03_sim01_whole_lora_seed0_*.npz")
    assert os.path.basename(reference) != os.path.basename(edited)
    record = json.loads(str(plumbing.load_npz(edited)["provenance"]))["code"]
    assert record["edited"] == [STAGE] and record["commit"]
    assert run_stage("compare.py", [reference, str(mine), "--out", str(tmp_path / "compare.png")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if " against [" in x)
    assert f"changes code differs (files {STAGE})" in line and "paired by seed 0: gain " in line


# The resumed runs' settings: FAST's, 3 epochs, on one story in blocks of 5 TRs. With training
# windows every 4 s and a TR of 2 s, blocks of one shape then sit at two offsets from their first
# frame: a Lanczos kernel that depended on which block built it first would differ between a run
# resumed in a fresh process and the run never stopped.
RESUMED = ["--epochs", "3", "--tune-stories", "1", "--block-trs", "5"] + FAST[4:]


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory):
    """The reference: a run of the RESUMED settings, never stopped."""
    data, results, _ = trained
    res, ckpt = fresh_results(results, tmp_path_factory.mktemp("ref"), "ref")
    assert run_stage(STAGE, ["--data", data, "--results", res, "--checkpoints", ckpt, "--subject", "sim01"]
                     + RESUMED) == 0
    return res


def test_ctrl_c_says_how_to_resume_and_resume_continues_with_the_saved_settings(trained, uninterrupted, tmp_path,
                                                                                 capsys, monkeypatch):
    """Ctrl-C right after epoch 1 is saved: one line with the command to continue. That command
    (the run's own settings), as in a fresh process (as_a_fresh_process), trains epochs 2 and 3
    only, and ends where the uninterrupted run ended. A bare --resume does the same (the epochs and
    learning rates come from the checkpoint), and a flag that contradicts the checkpoint is
    refused, naming both values."""
    data, results, _ = trained
    res, ckpt = fresh_results(results, tmp_path, "a")
    real = ctrl_c_after_each_epoch(monkeypatch)
    capsys.readouterr()
    argv = ["--data", data, "--results", res, "--checkpoints", ckpt, "--subject", "sim01"] + RESUMED
    assert run_stage(STAGE, argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted: continue with `python 03_finetune_lora.py") and len(err.splitlines()) == 1
    hint = err.split("`")[1].split()[2:]
    assert "--resume" in hint and "--epochs" in hint
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    saved = snapshot_of(ckpt)
    # a contradicting flag: refused, nothing touched
    fails_cleanly(STAGE, ["--data", data, "--results", res, "--checkpoints", ckpt, "--subject", "sim01", "--resume",
                          "--epochs", "5"], capsys, "was started with --epochs 3, you gave --epochs 5", res, ckpt)
    fails_cleanly(STAGE, ["--data", data, "--results", res, "--checkpoints", ckpt, "--subject", "sim01", "--resume",
                          "--lr-adapter", "1e-4"], capsys, "was started with --lr-adapter 0.003, you gave --lr-adapter 0.0001",
                  res, ckpt)
    assert snapshot_of(ckpt) == saved
    as_a_fresh_process(monkeypatch)
    assert run_stage(STAGE, hint) == 0
    out = capsys.readouterr().out
    assert "after epoch 1" in out and "epoch 2:" in out and "epoch 3:" in out and "epoch 1:" not in out
    _same_result(uninterrupted, res)
    # the same with a bare --resume (no training flags at all) from a copy of the interrupted state
    res_b, ckpt_b = fresh_results(results, tmp_path, "b")
    ctrl_c_after_each_epoch(monkeypatch)
    assert run_stage(STAGE, argv[:2] + ["--results", res_b, "--checkpoints", ckpt_b] + argv[6:]) == 130
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    as_a_fresh_process(monkeypatch)
    assert run_stage(STAGE, ["--data", data, "--results", res_b, "--checkpoints", ckpt_b, "--subject", "sim01",
                             "--resume"]) == 0
    _same_result(uninterrupted, res_b)


def snapshot_of(folder):
    from helpers import snapshot
    return snapshot(folder)


class _FileSteps:
    """Counts the file-system steps of checkpoint saves (os.replace, shutil.rmtree, torch.save,
    peft's save_pretrained) and raises KeyboardInterrupt at step `crash_at`; `torn`: that step, a
    torch.save, first leaves half a file on disk."""

    def __init__(self, monkeypatch):
        import peft
        self.real = dict(replace=os.replace, rmtree=shutil.rmtree, save=torch.save,
                         pretrained=peft.PeftModel.save_pretrained)
        self.steps, self.crash_at, self.torn, self.counting = 0, None, False, False
        monkeypatch.setattr(os, "replace", self.step("replace"))
        monkeypatch.setattr(shutil, "rmtree", self.step("rmtree"))
        monkeypatch.setattr(torch, "save", self.step("save"))
        monkeypatch.setattr(peft.PeftModel, "save_pretrained", self.step("pretrained"))

    def step(self, name):
        def f(*a, **k):
            if self.counting:
                self.steps += 1
                if self.steps == self.crash_at:
                    if name == "save" and self.torn:  # half a state file on disk, then the crash
                        open(a[1], "wb").write(b"\x80\x02torn")
                    raise KeyboardInterrupt
            return self.real[name](*a, **k)
        return f


def test_a_crash_at_any_step_of_a_checkpoint_save_leaves_the_old_or_the_new_copy_whole(tmp_path, monkeypatch):
    """Every file-system step of a checkpoint save, interrupted in turn (and a torch.save cut off
    mid-file), on small checkpoint folders: recover_checkpoint then finds one complete copy, the
    one before the save or the one it was writing, with that epoch's adapters and readout, and no
    leftovers; a first save interrupted leaves either nothing or the whole checkpoint."""
    from safetensors.torch import load_file
    model = common.add_lora(common.load_wavlm("tiny"), 2, 2, 0.0, ["q_proj"])
    readout = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(readout.parameters(), lr=1e-3)
    steps = _FileSteps(monkeypatch)

    def save(folder, epoch, crash_at=None, torn=False):
        with torch.no_grad():  # every adapter and the readout carry the epoch's number
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.fill_(epoch)
            readout.weight.fill_(epoch)
        steps.steps, steps.crash_at, steps.torn, steps.counting = 0, crash_at, torn, True
        try:
            checkpoints.save_checkpoint(folder, model, readout, opt, epoch, dict(val_r=[0.0] * (epoch + 1)),
                                        dict(run="x"))
        finally:
            steps.counting = False

    def whole_copy(folder):
        """The epoch of the complete copy recovered at `folder`, checked to be consistent (or None)."""
        if not checkpoints.recover_checkpoint(folder):
            assert not os.path.exists(folder)
            return None
        state = checkpoints.read_state(folder)
        adapters = load_file(os.path.join(folder, "model", "adapter_model.safetensors"))
        assert adapters and all(torch.all(t == state["epoch"]) for t in adapters.values())
        assert torch.all(state["readout"]["weight"] == state["epoch"]) and len(state["history"]["val_r"]) == state["epoch"] + 1
        return state["epoch"]

    save(str(tmp_path / "count" / "last"), 1)
    save(str(tmp_path / "count" / "last"), 2)
    n_steps = steps.steps  # the steps of a save over an existing copy
    assert n_steps >= 5  # the counting sees the save: rmtree, model, state, renames, cleanup
    seen = set()
    for k, torn in [(k, False) for k in range(1, n_steps + 1)] + [(k, True) for k in range(1, n_steps + 1)]:
        folder = str(tmp_path / f"{k}{'t' if torn else ''}" / "last")
        save(folder, 1)
        try:
            save(folder, 2, crash_at=k, torn=torn)
        except KeyboardInterrupt:
            pass
        epoch = whole_copy(folder)
        assert epoch in (1, 2), (k, torn)
        seen.add(epoch)
        assert os.listdir(os.path.dirname(folder)) == ["last"], (k, torn)  # no .tmp or .old left over
        save(folder, 3)  # the run goes on from there
        assert whole_copy(folder) == 3
    assert seen == {1, 2}  # early crashes keep the old copy, late ones the new
    for k in range(1, n_steps + 1):  # the very first save of a run
        folder = str(tmp_path / f"first{k}" / "best")
        try:
            save(folder, 0, crash_at=k)
        except KeyboardInterrupt:
            pass
        assert whole_copy(folder) in (None, 0), k
        parent = os.path.dirname(folder)
        assert not os.path.exists(parent) or not any(f.endswith((".tmp", ".old")) for f in os.listdir(parent)), k


def test_a_crash_mid_save_then_resume_gives_the_uninterrupted_result(trained, uninterrupted, tmp_path,
                                                                     monkeypatch, capsys):
    """End to end, at three points (the first step of epoch 2's best/ save, the last step of its
    last/ save, and a torch.save torn mid-file): --resume, as in a fresh process, finishes with the
    very result of the run that was never stopped. Every other crash point is covered on small
    checkpoint folders above."""
    data, results, _ = trained
    steps = _FileSteps(monkeypatch)
    saves, real_save = [0], checkpoints.save_checkpoint

    def counted_save(*a):
        saves[0] += 1
        steps.counting = saves[0] in (3, 4)  # epoch 1 saved best/ and last/: the next two saves
        try:
            return real_save(*a)
        finally:
            steps.counting = False
    monkeypatch.setattr(checkpoints, "save_checkpoint", counted_save)
    argv = ["--subject", "sim01"] + RESUMED

    def attempt(crash_at, torn=False):
        res, ckpt = fresh_results(results, tmp_path, f"{crash_at}{'t' if torn else ''}")
        saves[0], steps.steps, steps.crash_at, steps.torn = 0, 0, crash_at, torn
        code = run_stage(STAGE, ["--data", data, "--results", res, "--checkpoints", ckpt] + argv)
        return code, res, ckpt
    code, _, _ = attempt(None)  # a dry run counts the steps
    n_steps = steps.steps
    assert code == 0 and n_steps >= 8
    for k, torn in [(1, False), (n_steps, False), (3, True)]:
        code, res, ckpt = attempt(k, torn)
        assert code == 130, (k, code)
        steps.crash_at = None
        capsys.readouterr()
        as_a_fresh_process(monkeypatch)
        assert run_stage(STAGE, ["--data", data, "--results", res, "--checkpoints", ckpt, "--resume"] + argv) == 0, k
        assert "resuming" in capsys.readouterr().out and os.path.exists(one(f"{res}/03_*.png"))
        _same_result(uninterrupted, res)
        assert not any(f.endswith((".tmp", ".old")) for f in os.listdir(one(f"{ckpt}/03_*")))


def test_recover_checkpoint_picks_the_newest_complete_copy(tmp_path):
    folder = str(tmp_path / "last")

    def make(path, epoch, complete=True):
        os.makedirs(path)
        open(os.path.join(path, "epoch"), "w").write(str(epoch))
        if complete:
            open(os.path.join(path, "state.pt"), "w").write("x")
    epoch = lambda: open(os.path.join(folder, "epoch")).read()  # noqa: E731
    assert not checkpoints.recover_checkpoint(folder)  # nothing there
    make(folder + ".old", 1)
    make(folder + ".tmp", 2)  # crashed between renaming the old copy aside and the new one in
    assert checkpoints.recover_checkpoint(folder) and epoch() == "2" and os.listdir(tmp_path) == ["last"]
    make(folder + ".tmp", 3, complete=False)  # crashed while writing the next: the current one stays
    assert checkpoints.recover_checkpoint(folder) and epoch() == "2" and os.listdir(tmp_path) == ["last"]


def test_each_scenario_of_a_lost_result_gives_a_separate_file(trained, tmp_path):
    """Another loss replaces nothing: the run's name carries its settings' tag. The same settings
    replace their own result. Stage 02 on a subset draws its own figure."""
    data, results, _ = trained
    out, ckpt = str(tmp_path / "r"), str(tmp_path / "c")
    shutil.copytree(results, out)
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert run_stage(STAGE, ["--data", data, "--results", out, "--checkpoints", ckpt, "--subject", "sim01",
                             "--loss", "mse"] + FAST) == 0  # the loss alone differs from the trained run
    after = os.listdir(out)
    assert all(os.path.getmtime(os.path.join(out, f)) == t for f, t in before.items())  # nothing replaced
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and new[0].startswith("03_sim01_whole_lora_seed0_") and new[0] not in before
    settings = json.loads(str(plumbing.load_npz(os.path.join(out, [f for f in new if f.endswith(".npz")][0]))["settings"]))
    assert settings["loss"] == "mse"


def test_every_training_setting_alone_changes_the_run_tag(monkeypatch):
    """A run's name carries a tag of every setting that differs from the defaults: each setting
    changed alone gives a tag of its own (the mode, LoRA or full, is in the name itself); so does
    code edited since the commit. (The committed code here, whatever the checkout's state.)"""
    m = stage(STAGE)

    def run_tag(args, baseline):
        return checkpoints.run_tag(args, baseline, m.run_settings(args), m.DEFAULTS, STAGE)
    committed = dict(fingerprint="c0de", files={}, commit="abc", edited=[])
    monkeypatch.setattr(checkpoints, "code_state", lambda script: committed)
    assert run_tag(m.get_args([]), dict(tag="")) == ""
    monkeypatch.setattr(checkpoints, "code_state", lambda script: dict(committed, edited=[STAGE]))
    edited = run_tag(m.get_args([]), dict(tag=""))
    monkeypatch.setattr(checkpoints, "code_state", lambda script: dict(committed, fingerprint="0ther", edited=[STAGE]))
    assert edited and run_tag(m.get_args([]), dict(tag="")) not in ("", edited)  # each edit its own name
    monkeypatch.setattr(checkpoints, "code_state", lambda script: committed)
    new = dict(loss="mse", norm="none", tune_stories=3, layer=2, train_window_feature="first",
               lanczos_floor=1e-10, block_history="zeros", block_order="stories",
               best_epoch="linearized", readout_init="xavier", recipe="authors")
    tags = {}
    for k in m.TRAIN_SETTINGS:
        if k == "full_finetune":
            continue
        args = m.get_args([])
        v = getattr(args, k)
        if k not in new:
            new[k] = v + ["out_proj"] if isinstance(v, list) else v + 1
        setattr(args, k, new[k])
        tags[k] = run_tag(args, dict(tag=""))
        assert tags[k] and list(tags.values()).count(tags[k]) == 1, (k, tags)
    assert run_tag(m.get_args([]), dict(tag="abcdef")) not in [""] + list(tags.values())  # another stage 02 result
    # every flag is a training setting, or one of these (what the run is of, where, how fast): a new
    # flag left out of TRAIN_SETTINGS would give runs of two settings one name
    elsewhere = {"baseline_tag", "checkpoints", "compile", "data", "device", "init_from", "joint",
                 "results", "resume", "roi", "seed", "seeds", "subject", "threads", "help"}
    flags = {a.dest for a in m.get_parser()._actions}
    assert flags - elsewhere == set(m.TRAIN_SETTINGS), flags - elsewhere ^ set(m.TRAIN_SETTINGS)


def test_roi_restricts_the_readout(trained, tmp_path):
    data, results, _ = trained
    ckpt = str(tmp_path / "ckpt")
    assert run_stage(STAGE, ["--data", data, "--results", results, "--checkpoints", ckpt, "--subject", "sim01",
                             "--roi", "AC"] + FAST[:1] + ["1"] + FAST[2:]) == 0
    out = plumbing.load_npz(one(f"{results}/03_sim01_AC_lora_seed0_*.npz"))
    ac = plumbing.load_npz(f"{data}/subjects/sim01.npz")["roi_AC"]
    np.testing.assert_array_equal(out["roi_mask"], ac)
    assert np.all(np.isnan(out["test_r_direct"][~ac])) and np.all(np.isfinite(out["test_r_direct"][ac]))
    state = torch.load(one(f"{ckpt}/03_sim01_AC_lora_seed0_*") + "/best/state.pt", weights_only=True)
    assert state["readout"]["sim01.weight"].shape[0] == ac.sum()


def test_bad_inputs(trained, tmp_path, capsys):
    data, results, _ = trained
    ckpt = str(tmp_path / "c")
    fails_cleanly(STAGE, ["--data", data, "--results", results, "--checkpoints", ckpt, "--roi", "V1"], capsys,
                  "unknown ROI", results, ckpt)
    # no stage 02 result: the hint carries the user's own folders
    err = fails_cleanly(STAGE, ["--data", data, "--results", str(tmp_path / "none"), "--subject", "sim01"], capsys,
                        "no stage 02 result for sim01", str(tmp_path / "none"))
    assert f"python 02_baseline_ridge.py --data {data} --results {tmp_path / 'none'} --subjects sim01" in err
    empty = tmp_path / "d"
    shutil.copytree(data, empty, ignore=shutil.ignore_patterns("features"))
    d = plumbing.load_npz(empty / "subjects" / "sim01.npz")
    d["roi_AC"] = np.zeros_like(d["roi_AC"])
    plumbing.save_npz(empty / "subjects" / "sim01.npz", **d)
    fails_cleanly(STAGE, ["--data", str(empty), "--results", results, "--checkpoints", ckpt, "--subject", "sim01",
                          "--roi", "AC"], capsys, "the AC mask of sim01 is empty", results, ckpt)


@pytest.mark.parametrize("flags, msg", [
    (["--block-trs", "0"], "--block-trs 0 is out of range: it must be >= 1"),
    (["--epochs", "0"], "--epochs 0 is out of range"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (["--lora-targets", "q_proj", "nonexistent"], "--lora-targets nonexistent: not a linear layer"),
    (["--train-stride-s", "0.03"], "--train-stride-s 0.03 must be a positive multiple of WavLM's 20 ms frame"),
    (["--lr-adapter", "0"], "--lr-adapter 0 is out of range: it must be > 0"),
    (["--lora-dropout", "1"], "--lora-dropout 1 is out of range"),
    (["--grad-clip", "-1"], "--grad-clip -1 is out of range"),
    (["--tune-stories", "0"], "--tune-stories 0 is out of range: it must be >= 1"),
    (["--tune-stories", "9"], "--tune-stories 9: the study has 3 training stories"),
    (["--baseline-tag", "zz"], "--baseline-tag 'zz'"),
    (["--loss", "l1"], "argument --loss: invalid choice: 'l1'"),
    (["--resume"], "--resume: no checkpoint of 03_sim01_whole_lora_seed0"),
    (["--init-from", "AC"], "--init-from AC: want exactly one checkpoint 03_sim01_AC_lora_seed0"),
])
def test_bad_ranges_are_one_line_and_write_nothing(trained, tmp_path, capsys, flags, msg):
    data, results, _ = trained
    out, ckpt = str(tmp_path / "r"), str(tmp_path / "c")
    shutil.copytree(results, out)
    err = fails_cleanly(STAGE, ["--data", data, "--results", out, "--checkpoints", ckpt, "--subject", "sim01"] + flags,
                        capsys, msg, out, ckpt, data)
    assert not os.path.exists(ckpt)
    if "nonexistent" in flags:  # the message lists what can be adapted
        assert all(name in err for name in ("q_proj", "out_proj", "intermediate_dense", "projection"))


# --------------------------------------------------------------------------- --init-from

def _baseline(data, results):
    """Stage 02's result as the stages read it (provenance.load_baseline: checked, with its provenance)."""
    import argparse
    return provenance.load_baseline(argparse.Namespace(results=results, data=data), "sim01", load_study(data))


def _features(model, tiny_study):
    audio = plumbing.load_npz(f"{tiny_study}/stories/story00.npz")["audio"][:16000 * 20]
    return common.extract_features(model, audio, layers=[1, 2], context_s=4.0, stride_s=2.0)[0]


@pytest.mark.parametrize("full", [False, True])
def test_init_from_starts_exactly_at_the_checkpoint(trained, tmp_path, full):
    data, results, ckpt = trained
    m = stage(STAGE)
    mode = ["--full-finetune"] if full else []
    if full:  # a full fine-tuning checkpoint to start from
        ckpt = str(tmp_path / "ckpt")
        import shutil
        shutil.copytree(results, tmp_path / "r")
        assert run_stage(STAGE, ["--data", data, "--results", str(tmp_path / "r"), "--checkpoints", ckpt,
                                 "--subject", "sim01", "--epochs", "1", "--block-trs", "16"] + mode) == 0
    source = one(f"{ckpt}/03_sim01_whole_{'full' if full else 'lora'}_seed0_*")
    baseline = _baseline(data, results)
    args = m.get_args(["--roi", "AC", "--init-from", source] + FAST + mode)
    model, readout, _, prov, init = m.setup_model(args, baseline, 1, {"sim01": 7}, "cpu")
    model.eval()  # new LoRA dropout modules start in train mode; compare without dropout
    assert init[:2] == (f"{source}/best", os.path.basename(source)) and readout["sim01"].out_features == 7
    ref = checkpoints.load_tuned_wavlm(common.load_wavlm(str(baseline["model"]), int(baseline["model_seed"])),
                                       f"{source}/best/model", full=full)
    plain = common.load_wavlm(str(baseline["model"]), int(baseline["model_seed"]))
    ours, theirs, base = _features(model, data), _features(ref, data), _features(plain, data)
    for a, b, c in zip(ours, theirs, base):
        np.testing.assert_array_equal(a, b)  # the first forward pass is the checkpoint's
        assert not np.allclose(a, c, atol=1e-4)  # and not the untuned model's


def test_init_from_run_is_named_and_recorded_and_read_by_stages_04_and_05(trained, tmp_path):
    data, results, ckpt = trained
    out = str(tmp_path / "r")
    shutil.copytree(results, out)
    source = one(f"{ckpt}/03_sim01_whole_lora_seed0_*")
    # --init-from whole: this subject's whole-cortex run of the same seed, found in --checkpoints
    assert run_stage(STAGE, ["--data", data, "--results", out, "--checkpoints", ckpt, "--subject", "sim01",
                             "--roi", "AC", "--init-from", "whole"] + FAST) == 0
    path = one(f"{out}/03_sim01_AC_lora_seed0_*_from_{os.path.basename(source)[3:]}.npz")
    res = plumbing.load_npz(path)
    assert str(res["init_from"]) == f"{source}/best" and str(res["roi"]) == "AC"
    assert json.loads(str(res["provenance"]))["init_from"]["name"] == os.path.basename(source)
    assert os.path.isdir(f"{ckpt}/{os.path.basename(path)[:-4]}/best/model")
    assert str(plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))["init_from"]) == ""
    assert run_stage("04_cross_subject.py", ["--data", data, "--results", out, "--checkpoints", ckpt, "--roi", "AC",
                                             "--tuned-on", "sim01", "--evaluate-on", "sim01",
                                             "--init-from", "whole"]) == 0
    cross = plumbing.load_npz(one(f"{out}/04_cross_subject_AC_*_from_whole_sim01-on-sim01.npz"))
    np.testing.assert_allclose(cross["test_r_sim01_on_sim01"], res["test_r_tuned"], atol=1e-5)
    # stage 05 probes that AC run (and the whole-cortex run it started from)
    assert run_stage("05_linear_probes.py", ["--data", data, "--results", out, "--checkpoints", ckpt,
                                             "--init-from", "whole", "--n-folds", "2"]) == 0
    probes = plumbing.load_npz(one(f"{out}/05_probes_*from_whole*.npz"))
    assert list(probes["runs"]) == ["", os.path.basename(source), os.path.basename(path)[:-4]]


def test_init_from_refuses_checkpoints_that_do_not_fit(trained, tmp_path):
    data, results, ckpt = trained
    m = stage(STAGE)
    source = one(f"{ckpt}/03_sim01_whole_lora_seed0_*")
    baseline = _baseline(data, results)

    def refused(flags, base=baseline):
        with pytest.raises(plumbing.StudyError) as e:
            m.setup_model(m.get_args(["--roi", "AC"] + FAST + flags), base, 0, {"sim01": 5}, "cpu")
        return str(e.value)
    assert "is a lora checkpoint; this run is full" in refused(["--init-from", source, "--full-finetune"])
    assert "another LoRA shape" in refused(["--init-from", source, "--lora-rank", "8"])
    assert "another LoRA shape" in refused(["--init-from", source, "--lora-targets", "q_proj", "v_proj"])
    other = dict(baseline, model=np.array("tiny"))  # the random model, not the pretrained one
    assert "tuned from another base model (tiny-pretrained) than stage 02's (tiny)" in refused(["--init-from", source], other)
    assert "no stage 03 checkpoint there" in refused(["--init-from", str(tmp_path)])
    old = tmp_path / "old"  # a checkpoint written before origins were recorded
    import shutil
    shutil.copytree(f"{source}/best", old)
    state = torch.load(old / "state.pt", weights_only=True)
    del state["provenance"]
    torch.save(state, old / "state.pt")
    assert "predates provenance records" in refused(["--init-from", str(old)])
