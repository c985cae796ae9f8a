"""WavLM over many windows at once: the machinery under common.extract_features and common.block_inputs.

Used by common.py (features and BrainWavLM's training step), models/pretrain_tiny.py and bench/.
The frozen CNN's output is computed once (per story for a frame-local CNN, cached on disk; per
window for a group-norm one) and kept; windows of any lengths go through the transformer in one
batch, padded, the padding zeroed before the positional convolution and masked out of attention;
their kept frames are gathered back in order; a memory budget sets how many windows a forward
takes. None of it changes what is computed, only how fast (tests/test_model.py: padded windows
equal one forward per window).
"""
import os

import numpy as np
import torch

from lib.plumbing import autocast, cached_npz, memory_budget, model_fingerprint, sha1, to_device

SR = 16000  # WavLM's audio rate: stage 01 resamples every story to it
FRAME_HOP = 320  # WavLM's CNN strides multiply to 320 samples: one frame per 20 ms at 16 kHz
FRAME_WIN = 400  # receptive field of one frame, in samples


def base_wavlm(model):
    """The WavLMModel inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def n_frames(n_samples):
    return (n_samples - FRAME_WIN) // FRAME_HOP + 1


def cnn_features(model, audio):
    """The frozen CNN front end: (batch, samples) -> (batch, frames, conv channels)."""
    with torch.no_grad():
        return base_wavlm(model).feature_extractor(audio).transpose(1, 2)


def story_cnn(model, audio, data=None, story=None):
    """A local (layer-norm) CNN's output for a whole story (frames x channels): each frame sees only
    its own 25 ms, so the frozen CNN runs once per story, not per window (None for group-norm CNNs
    such as wavlm-base-plus's, which normalise over their input). With `data` and `story`, cached in
    <data>/features/cnn-<hash of the CNN>/: stages 02, 03 and 05 share one pass."""
    m = base_wavlm(model)
    if m.config.feat_extract_norm != "layer":
        return None
    x = torch.as_tensor(audio, dtype=torch.float32, device=next(m.parameters()).device).reshape(-1)
    F, chunk = n_frames(len(x)), 3000  # 60 s of frames at a time: bounded memory

    def compute():
        return torch.cat([cnn_features(m, x[None, f0 * FRAME_HOP:(min(F, f0 + chunk) - 1) * FRAME_HOP + FRAME_WIN])[0]
                          for f0 in range(0, F, chunk)])
    if data is None:
        return compute()
    path = os.path.join(data, "features", f"cnn-{model_fingerprint(m.feature_extractor)[:16]}", f"{story}.npz")
    cnn = cached_npz(path, sha1(x.cpu().numpy()), lambda: compute().cpu().numpy(), "cnn")
    return torch.as_tensor(cnn, device=x.device)


def window_cnn(model, audio, windows, cnn=None):
    """The frozen CNN's output for each window (clip frames x channels; windows as common.feature_windows
    gives them: (first sample, end sample, first kept frame, end kept frame)). A frame-local CNN
    gives slices of the story's (`cnn`, story_cnn's, for windows on the story's frame grid; windows
    that start between two of its frames slice the story's output from their own first sample on);
    a group-norm CNN normalises over its whole input, so each window runs on its own audio (windows
    of one length batched, under autocast as the rest)."""
    m = base_wavlm(model)
    if m.config.feat_extract_norm == "layer":
        by_phase = {}  # the story's CNN output from sample `phase` on: 0 is the story's own grid
        out = []
        for a, b, _, _ in windows:
            phase = a % FRAME_HOP
            if phase not in by_phase:
                by_phase[phase] = story_cnn(m, audio[phase:]) if phase or cnn is None else cnn
            first = a // FRAME_HOP
            out.append(by_phase[phase][first:first + n_frames(b - a)])
        return out
    out, lengths = [None] * len(windows), {}
    for i, (a, b, _, _) in enumerate(windows):
        lengths.setdefault(b - a, []).append(i)
    for length, idx in lengths.items():
        n = windows_per_batch(m, n_frames(length), audio.device, cnn=True)
        for j in range(0, len(idx), n):
            batch = idx[j:j + n]
            clips = [audio[windows[i][0]:windows[i][1]] for i in batch]
            with autocast(audio.device):
                for i, c in zip(batch, cnn_features(m, torch.stack(clips)).unbind()):
                    out[i] = c
    return out


def windows_per_batch(model, frames, device, grad=False, cnn=False):
    """How many windows of `frames` frames one forward takes within the memory budget
    (plumbing.memory_budget: a share of a GPU's free memory): an estimate of one window's
    activations, the attention's heads x T x T bias included (the CNN's first layer, for `cnn`)."""
    c = base_wavlm(model).config
    if cnn:
        per_window = 12 * c.conv_dim[0] * frames * FRAME_HOP // c.conv_stride[0]
    else:
        per_frame = 2 * c.intermediate_size + (12 + c.num_hidden_layers) * c.hidden_size + 4 * c.num_attention_heads * frames
        per_window = 4 * frames * per_frame * (3 * c.num_hidden_layers if grad else 1)
    return max(1, int(memory_budget(device) // per_window))


def hidden_states_from_cnn(model, cnn, n_layers=None, attention_mask=None, mask=None, mask_embed=None):
    """WavLM from CNN output: [input to layer 1, output of layer 1, ..., of n_layers] (transformers'
    hidden_states; the layers above never run). attention_mask (batch x frames, True = real):
    padded frames. mask (batch x frames): those frames become mask_embed, for
    models/pretrain_tiny.py (transformers ignores mask_time_indices once SpecAugment is off)."""
    m = base_wavlm(model)
    enc, (h, _) = m.encoder, m.feature_projection(cnn)
    if mask is not None:
        h = torch.where(mask[..., None], mask_embed.to(h.dtype), h)
    if attention_mask is not None:  # padding is zeros, as beyond a window's ends, to the positional conv
        h = h * attention_mask[..., None].to(h.dtype)
    h = h + enc.pos_conv_embed(h)
    states, bias = [enc.dropout(h if m.config.do_stable_layer_norm else enc.layer_norm(h))], None
    for layer in enc.layers[:n_layers if n_layers is not None else len(enc.layers)]:
        h, bias = layer(states[-1], attention_mask=attention_mask, position_bias=bias)
        states.append(h)
    return states


def encode_windows(model, cnns, n_layers):
    """One WavLM forward over windows of any lengths (their CNN outputs): padded to the longest,
    the padding zeroed before the positional convolution and masked out of the attention, so each
    window's hidden states are the ones it has alone. Returns hidden states 0..n_layers, each
    windows x longest x hidden."""
    device = next(base_wavlm(model).parameters()).device
    if cnns[0].device != device:  # kept in pinned host memory (load_stories): copied in, asynchronously
        cnns = [c.to(device, non_blocking=True) for c in cnns]
    lengths = np.array([len(c) for c in cnns])
    longest, mask = lengths.max(), None
    if (lengths < longest).any():
        mask = to_device(np.arange(longest)[None, :] < lengths[:, None], device)
        cnns = [torch.nn.functional.pad(c, (0, 0, 0, longest - len(c))) if len(c) < longest else c for c in cnns]
    return hidden_states_from_cnn(model, torch.stack(cnns), n_layers, attention_mask=mask)


def kept_frames(states, windows):
    """Each window's kept frames one after the other: windows x longest x hidden in, features x
    hidden out (the story's features in order, when the windows are its grid)."""
    longest = states.shape[1]
    idx = np.concatenate([j * longest + np.arange(k0, k1) for j, (_, _, k0, k1) in enumerate(windows)])
    return states.reshape(-1, states.shape[-1])[to_device(idx, states.device)]
