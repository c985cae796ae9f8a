"""The WavLM model: the LoRA-able attention patch, LoRA gradients, causal windowed features."""
import numpy as np
import pytest
import torch
from transformers import WavLMModel

import common
from lib import batching, plumbing


def stock_and_patched(cfg, seed=0):
    torch.manual_seed(seed)
    stock = WavLMModel(cfg).eval()
    torch.manual_seed(seed)
    patched = common.make_lora_able(WavLMModel(cfg)).eval()
    return stock, patched


def speechlike(seconds, seed=0):
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    env = np.repeat(rng.uniform(0, 1, n // 1600 + 1), 1600)[:n]
    return (rng.standard_normal(n) * env * 0.3).astype(np.float32)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_patched_attention_equals_stock(norm):
    cfg = common.tiny_config()
    cfg.feat_extract_norm = norm
    stock, patched = stock_and_patched(cfg)
    x = torch.tensor(np.stack([speechlike(3, 1), speechlike(3, 2)]))
    with torch.no_grad():
        a = stock(x, output_hidden_states=True).hidden_states
        b = patched(x, output_hidden_states=True).hidden_states
    assert len(a) == cfg.num_hidden_layers + 1
    for ha, hb in zip(a, b):
        torch.testing.assert_close(hb, ha, atol=1e-5, rtol=1e-5)
    # with padding: the second clip is 1 s shorter, padded with zeros and masked
    mask = torch.ones_like(x, dtype=torch.long)
    mask[1, -16000:] = 0
    xp = x.clone()
    xp[1, -16000:] = 0
    with torch.no_grad():
        a = stock(xp, attention_mask=mask, output_hidden_states=True).hidden_states
        b = patched(xp, attention_mask=mask, output_hidden_states=True).hidden_states
    valid = batching.n_frames(3 * 16000 - 16000)
    for ha, hb in zip(a, b):
        torch.testing.assert_close(hb[0], ha[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hb[1, :valid], ha[1, :valid], atol=1e-5, rtol=1e-5)


def test_hidden_states_from_cnn_match_transformers():
    model = common.load_wavlm("tiny", seed=1)
    x = torch.tensor(speechlike(2.5))[None]
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states
        ours = batching.hidden_states_from_cnn(model, batching.cnn_features(model, x))
    assert len(ours) == len(ref)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    # stopping early gives the same lower layers
    with torch.no_grad():
        two = batching.hidden_states_from_cnn(model, batching.cnn_features(model, x), n_layers=1)
    assert len(two) == 2
    torch.testing.assert_close(two[1], ref[1])


def test_load_wavlm_is_seeded_and_lora_able():
    a, b, c = (common.load_wavlm("tiny", seed=s) for s in (0, 0, 1))
    pa, pb, pc = (next(m.encoder.layers[0].attention.q_proj.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert sum(p.numel() for p in a.parameters()) < 1_000_000
    assert not any(p.requires_grad for p in a.feature_extractor.parameters())
    assert a.config.layerdrop == 0 and not a.config.apply_spec_augment


def _lora_grads(model):
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for n, p in lora.items():  # B starts at zero (so A's gradient would too): give it a value
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.tensor(speechlike(2.0))[None]
    states = batching.hidden_states_from_cnn(model, batching.cnn_features(model, x))
    loss = states[-1].pow(2).mean()
    if loss.requires_grad:  # on stock attention nothing trainable even reaches the output
        loss.backward()
    return lora


def test_every_lora_tensor_gets_a_gradient():
    model = common.add_lora(common.load_wavlm("tiny", seed=0).train(), rank=4, alpha=4, dropout=0.0)
    lora = _lora_grads(model)
    assert len(lora) == 2 * 3 * model.config.num_hidden_layers  # A and B for q, k, v in each layer
    for n, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_the_demo_lora_targets_all_get_a_gradient():
    """The demo's wider target set (Makefile LORA), the feature projection included."""
    targets = ("projection", "q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense")
    model = common.add_lora(common.load_wavlm("tiny", seed=0).train(), rank=4, alpha=4, dropout=0.0, targets=targets)
    lora = _lora_grads(model)
    assert len(lora) == 2 * (1 + 6 * model.config.num_hidden_layers)
    assert any("feature_projection.projection.lora_A" in n for n in lora)
    for n, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_the_trap_stock_attention_gives_lora_no_gradient():
    """Documents why make_lora_able exists: on stock transformers LoRA on q/k/v is a silent no-op."""
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    stock = WavLMModel(common.tiny_config())
    model = get_peft_model(stock, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    lora = _lora_grads(model)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lora.values())


def test_features_are_causal_beyond_one_stride():
    model = common.load_wavlm("tiny", seed=0)
    audio = speechlike(14.0)
    kw = dict(context_s=3.0, stride_s=1.0, layers=[1, 3])
    feats, times = common.extract_features(model, audio, **kw)
    assert [f.shape for f in feats] == [(batching.n_frames(len(audio)), 96)] * 2
    changed = audio.copy()
    t_change = 9.0
    changed[int(t_change * 16000):] = speechlike(5.0, seed=9)
    feats2, _ = common.extract_features(model, changed, **kw)
    # a frame's window ends less than stride_s after it: audio from t_change on is unseen before
    safe = times + 1.0 + 0.02 < t_change
    for f, g in zip(feats, feats2):
        np.testing.assert_array_equal(f[safe], g[safe])
        assert np.abs(f[times > t_change] - g[times > t_change]).max() > 1e-3


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_lab_recipe_equals_naive_window_by_window(norm):
    """stride_s=0.1 keeping 5 frames per window == one plain forward per window, done naively."""
    cfg = common.tiny_config(hidden=32, layers=2, heads=2)
    cfg.feat_extract_norm = norm
    torch.manual_seed(0)
    model = common.make_lora_able(WavLMModel(cfg)).eval()
    audio = speechlike(3.0, seed=4)
    context = 1.0
    feats, times = common.extract_features(model, audio, context_s=context, stride_s=0.1)
    F = batching.n_frames(len(audio))
    naive = [[] for _ in feats]
    for k0 in range(0, F, 5):
        a = max(0, k0 - 50)
        k1 = min(F, k0 + 5)
        seg = torch.tensor(audio[a * 320:(k1 - 1) * 320 + 400])[None]
        with torch.no_grad():
            hs = model(seg, output_hidden_states=True).hidden_states
        for li, h in enumerate(hs):
            naive[li].append(h[0, -(k1 - k0):].numpy())
    for f, n in zip(feats, naive):
        np.testing.assert_allclose(f, np.concatenate(n), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(times[:2], [0.0125, 0.0325])


def test_extract_features_bad_input():
    model = common.load_wavlm("tiny")
    with pytest.raises(plumbing.StudyError, match="16 kHz"):
        common.extract_features(model, speechlike(1.0), sr=22050)
    with pytest.raises(plumbing.StudyError, match="multiple of WavLM's 20 ms frame"):
        common.extract_features(model, speechlike(1.0), stride_s=0.05)
    with pytest.raises(plumbing.StudyError, match="out of range"):
        common.extract_features(model, speechlike(1.0), layers=[7])


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine with no internet
    with pytest.raises(plumbing.StudyError, match="could not load WavLM"):
        common.load_wavlm("no-such-org/no-such-wavlm")
