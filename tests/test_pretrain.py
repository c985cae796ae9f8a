"""models/pretrain_tiny.py: the recipe learns, the masking masks, and the committed model is what it says."""
import json
import os

import numpy as np
import torch

import common
from lib import batching
from helpers import stage


def recipe():
    return stage("models/pretrain_tiny.py")


def test_masked_frames_are_replaced_and_only_they_change_the_input():
    model = common.load_wavlm("tiny", 0)
    cnn = torch.randn(2, 50, 128)
    embed = torch.randn(96)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[0, 10:20] = True
    with torch.no_grad():
        plain = batching.hidden_states_from_cnn(model, cnn)
        none = batching.hidden_states_from_cnn(model, cnn, mask=torch.zeros_like(mask), mask_embed=embed)
        masked = batching.hidden_states_from_cnn(model, cnn, mask=mask, mask_embed=embed)
    torch.testing.assert_close(none[-1], plain[-1])
    assert not torch.allclose(masked[-1][0, 10:20], plain[-1][0, 10:20], atol=1e-3)
    torch.testing.assert_close(masked[-1][1], plain[-1][1])  # the other crop is untouched


def test_a_few_steps_of_the_recipe_lower_the_loss():
    m = recipe()
    args = m.get_args(["--n-stories", "3", "--n-held-out", "1", "--story-seconds", "30", "--n-voices", "1",
                       "--rates", "170", "--units", "16", "--steps", "40", "--eval-every", "20", "--batch", "4",
                       "--crop-s", "4"])
    rng = np.random.default_rng(args.seed)
    stories, vocab = m.make_corpus(args, rng)
    assert len(vocab) == 215 and {"dog", "cat", "horse", "mouse"} <= set(vocab)  # the study's words, a subset
    model = common.load_wavlm("tiny", 0)
    cnn_before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    cnn = [batching.story_cnn(model, st["audio"]) for st in stories]
    feats = [m.unit_features(st["audio"]) for st in stories]
    x = np.concatenate(feats)
    feats = [(f - x.mean(0)) / x.std(0) for f in feats]
    units = [m.assign(f, m.kmeans(np.concatenate(feats), 16, rng)) for f in feats]
    assert all(len(u) == len(c) for u, c in zip(units, cnn))  # one unit per WavLM frame
    curve = m.pretrain(args, model, cnn, units, np.arange(2), np.arange(2, 3), rng, log=lambda *_: None)
    assert curve["step"] == [0, 20, 40]
    assert curve["loss"][2] < curve["loss"][1] < np.log(16)  # below chance, and still falling
    for k, v in model.feature_extractor.state_dict().items():  # the CNN stays frozen
        torch.testing.assert_close(v, cnn_before[k])


def test_the_committed_pretrained_model_is_the_tiny_architecture_with_trained_weights():
    pre = common.load_wavlm("tiny-pretrained")
    rnd = common.load_wavlm("tiny", 0)
    ref = common.tiny_config()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                "conv_stride", "conv_kernel", "feat_extract_norm", "conv_bias"):
        a, b = getattr(pre.config, key), getattr(ref, key)
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), key
    assert not pre.config.apply_spec_augment and pre.config.layerdrop == 0.0
    a, b = pre.state_dict(), rnd.state_dict()
    assert a.keys() == b.keys()
    # the CNN is the random seed-0 one (frozen while pretraining); the transformer was trained
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("feature_extractor"))
    assert not torch.allclose(a["encoder.layers.0.attention.q_proj.weight"], b["encoder.layers.0.attention.q_proj.weight"])
    log = json.load(open(os.path.join(common.PRETRAINED_TINY, "pretrain_log.json")))
    assert log["curve"]["held_acc"][-1] > 4 * log["curve"]["held_acc"][0]
    assert max(log["word_probe_pretrained"]) > max(log["word_probe_random"])
