"""WavLM over many windows at once: the machinery under common.extract_features and common.block_inputs.

Used by common.py (features and BrainWavLM's training step), stage 03 (its stories, blocks and their
order), models/pretrain_tiny.py and bench/. A story's windows: this repository's (every frame of
each window's last stride, with past context) or the authors' (one frame per window, stamped at
its end: docs/methods.md).
The frozen CNN's output is computed once (per story for a frame-local CNN, cached on disk; per
window for a group-norm one) and kept; windows of any lengths go through the transformer in one
batch, padded, the padding zeroed before the positional convolution and masked out of attention;
their kept frames are gathered back in order; a memory budget sets how many windows a forward
takes. None of it changes what is computed, only how fast (tests/test_model.py: padded windows
equal one forward per window).
"""
import copy
import os

import numpy as np
import torch

from lib.plumbing import (StudyError, autocast, cached_npz, check_window, load_npz, memory_budget,
                          model_fingerprint, sha1, to_device)

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


def story_cnn(model, audio, data=None, story=None, phase=0):
    """A local (layer-norm) CNN's output for a whole story (frames x channels): each frame sees only
    its own 25 ms, so the frozen CNN runs once per story, not per window (None for group-norm CNNs
    such as wavlm-base-plus's, which normalise over their input). phase: from that sample on, for
    windows that start between two of the story's frames. With `data` and `story`, cached in
    <data>/features/cnn-<hash of the CNN>/: stages 02, 03 and 05 share one pass."""
    m = base_wavlm(model)
    if m.config.feat_extract_norm != "layer":
        return None
    x = torch.as_tensor(audio, dtype=torch.float32, device=next(m.parameters()).device).reshape(-1)[phase:]
    F, chunk = n_frames(len(x)), 3000  # 60 s of frames at a time: bounded memory

    def compute():
        return torch.cat([cnn_features(m, x[None, f0 * FRAME_HOP:(min(F, f0 + chunk) - 1) * FRAME_HOP + FRAME_WIN])[0]
                          for f0 in range(0, F, chunk)])
    if data is None:
        return compute()
    name = f"{story}.npz" if not phase else f"{story}@{phase}.npz"
    path = os.path.join(data, "features", f"cnn-{model_fingerprint(m.feature_extractor)[:16]}", name)
    cnn = cached_npz(path, sha1(x.cpu().numpy()), lambda: compute().cpu().numpy(), "cnn")
    return torch.as_tensor(cnn, device=x.device)


def story_cnns(model, audio, context_s, stride_s, take="stride", data=None, story=None):
    """story_cnn at each phase the story's windows (feature_windows') start at: {phase: output}
    (None for a group-norm CNN), so that no later pass over them runs the story's CNN again."""
    if base_wavlm(model).config.feat_extract_norm != "layer":
        return None
    windows = feature_windows(len(audio), context_s, stride_s, take)[0]
    return {p: story_cnn(model, audio, data, story, p) for p in sorted({a % FRAME_HOP for a, *_ in windows})}


def window_cnn(model, audio, windows, cnn=None):
    """The frozen CNN's output for each window (clip frames x channels; windows as feature_windows
    gives them: (first sample, end sample, first kept frame, end kept frame)). A frame-local CNN
    gives slices of the story's (`cnn`: story_cnn's, or story_cnns' for each phase; windows that
    start between two of the story's frames slice its output from their own first sample on);
    a group-norm CNN normalises over its whole input, so each window runs on its own audio (windows
    of one length batched, under autocast as the rest)."""
    m = base_wavlm(model)
    if m.config.feat_extract_norm == "layer":
        # the story's CNN output from sample `phase` on: 0 is the story's own grid
        by_phase = dict(cnn) if isinstance(cnn, dict) else {} if cnn is None else {0: cnn}
        out = []
        for a, b, _, _ in windows:
            phase = a % FRAME_HOP
            if phase not in by_phase:
                by_phase[phase] = story_cnn(m, audio, phase=phase)
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


def keep_mask_embed(model, seed, info=None):
    """SpecAugment's mask embedding moved out of the weights into `spec_embed`, a buffer outside the
    state_dict, so the model's fingerprint (which stages 02-05 check) is the same whether or not
    stage 03 masks (--mask-time-prob): the checkpoint's masked_spec_embed (info: from_pretrained's
    loading info), else a U(0, 1) draw from `seed` (WavLM's own initialisation)."""
    embed = model._parameters.pop("masked_spec_embed", None)
    if embed is None or info is None or "masked_spec_embed" in info["missing_keys"]:
        embed = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    model.register_buffer("spec_embed", embed.detach().float(), persistent=False)


def spec_augment_mask(config, shape, attention_mask=None):
    """SpecAugment's time mask (batch x frames, True = masked) as WavLM's training forward draws it:
    transformers' own _compute_mask_indices with the config's mask_time_prob, mask_time_length and
    mask_time_min_masks, each window's real frames from attention_mask. It draws from numpy's
    global RNG, seeded here from torch's (which stage 03 seeds and checkpoints, so a resumed run
    masks as the uninterrupted one), numpy's own state put back. A batch shorter than one span
    is not masked (transformers raises)."""
    from transformers.models.wavlm.modeling_wavlm import _compute_mask_indices
    seed, state = int(torch.randint(2 ** 31 - 1, ())), np.random.get_state()
    if shape[1] < config.mask_time_length:
        return np.zeros(shape, bool)
    np.random.seed(seed)
    try:
        return _compute_mask_indices(tuple(shape), config.mask_time_prob, config.mask_time_length,
                                     attention_mask, config.mask_time_min_masks)
    finally:
        np.random.set_state(state)


def hidden_states_from_cnn(model, cnn, n_layers=None, attention_mask=None, mask=None, mask_embed=None):
    """WavLM from CNN output: [input to layer 1, output of layer 1, ..., of n_layers] (transformers'
    hidden_states; the layers above never run). attention_mask (batch x frames, True = real):
    padded frames. mask (batch x frames): those frames become mask_embed, for
    models/pretrain_tiny.py (transformers ignores mask_time_indices once SpecAugment is off). In
    training, the config's layerdrop skips layers and its mask_time_prob masks frames with the
    model's spec_embed (load_wavlm's), as transformers does (stage 03 --layerdrop,
    --mask-time-prob)."""
    m = base_wavlm(model)
    enc, (h, _) = m.encoder, m.feature_projection(cnn)
    if mask is None and m.training and m.config.mask_time_prob > 0:  # SpecAugment
        mask = to_device(spec_augment_mask(m.config, h.shape[:2], attention_mask), h.device)
        mask_embed = m.spec_embed
    if mask is not None:
        h = torch.where(mask[..., None], mask_embed.to(h.dtype), h)
    if attention_mask is not None:  # padding is zeros, as beyond a window's ends, to the positional conv
        h = h * attention_mask[..., None].to(h.dtype)
    h = h + enc.pos_conv_embed(h)
    states, bias = [enc.dropout(h if m.config.do_stable_layer_norm else enc.layer_norm(h))], None
    drop = m.config.layerdrop if m.training else 0.0  # LayerDrop (stage 03 --layerdrop), else 0
    for i, layer in enumerate(enc.layers[:n_layers if n_layers is not None else len(enc.layers)]):
        # transformers' rule: one draw a layer a forward, never the first (it makes the position
        # bias); a skipped layer's state repeats the last, as transformers 4.33 listed them
        if drop > 0 and i > 0 and torch.rand([]) < drop:
            states.append(states[-1])
            continue
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


def compile_layers(model):
    """torch.compile on WavLM's transformer layers, where a step's time goes: their many small
    operations fused into fewer kernels (on a GPU, replayed as CUDA graphs, one per window shape).
    In place: names and checkpoints are unchanged. Returns the model."""
    mode = "reduce-overhead" if next(model.parameters()).is_cuda else "default"
    for layer in base_wavlm(model).encoder.layers:
        layer.compile(mode=mode)
    return model


def merged(model):
    """The model for passes without a gradient (linearized scoring, stages 04 and 05): a copy with
    LoRA's adapters merged into the weights they adapt (W + alpha/r B A: one matmul per projection
    where the adapter takes three). A model without adapters is returned as it is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload().eval()


# ---- windows over a story, and blocks into steps ----


FRAMES = (FRAME_WIN / 2, FRAME_HOP)  # the story's frames: the first centred at 12.5 ms, every 20 ms


def feature_times(times, first, count):
    """Seconds of features first .. first + count - 1 of a story whose features start at times[0]
    samples and follow every times[1] samples (FRAMES: frame centres)."""
    return ((first + np.arange(count)) * times[1] + times[0]) / SR


def window_grid(frames, context_s, stride_s):
    """A story's causal windows, one every stride_s seconds: (first frame fed, first frame kept,
    end). WavLM's attention is bidirectional, so causality comes from the windows: each keeps its
    last stride_s seconds of frames and sees up to context_s seconds of the past before them."""
    s, c = round(stride_s * SR / FRAME_HOP), round(context_s * SR / FRAME_HOP)
    return [(max(0, k - c), k, min(frames, k + s)) for k in range(0, frames, s)]


WINDOW_FEATURES = ("stride", "first", "last")


def feature_windows(n_samples, context_s, stride_s, take="stride"):
    """A story's windows as (first sample, end sample, first kept frame, end kept frame) of each
    clip, and its features' times (feature_times). take 'stride' (this repository's): window_grid,
    every frame of each window's last stride_s seconds kept at its centre, so the features are the
    story's frames. 'first' or 'last' (the authors' extract_features_hf.slide_window with
    target_token 0 or -1): windows of context_s + stride_s seconds ending every stride_s seconds
    (the first ones shorter: they start with the story), each giving one frame, stamped at the
    window's end. The authors' 'first' frame sees its window's future, not its past
    (docs/methods.md, the authors' code)."""
    if take == "stride":
        check_window(context_s, stride_s, ("context_s", "stride_s"))
        grid = window_grid(n_frames(n_samples), context_s, stride_s)
        return [(a * FRAME_HOP, (b - 1) * FRAME_HOP + FRAME_WIN, k - a, b - a)
                for a, k, b in grid], FRAMES
    if take not in WINDOW_FEATURES:
        raise StudyError(f"window feature {take!r}: choose one of {', '.join(WINDOW_FEATURES)}")
    length, step = round((context_s + stride_s) * SR), round(stride_s * SR)
    if step < 1 or abs(stride_s * SR - step) > 1e-6 or abs(context_s * SR - (length - step)) > 1e-6:
        raise StudyError(f"context_s {context_s:g} and stride_s {stride_s:g} must be whole numbers "
                         f"of samples at {SR} Hz, stride_s > 0")
    out = []
    for end in range(step, n_samples + 1, step):
        start = max(0, end - length)
        if end - start >= FRAME_WIN:  # as theirs: a clip shorter than one frame gives nothing
            n = n_frames(end - start)
            out.append((start, end, 0, 1) if take == "first" else (start, end, n - 1, n))
    return out, (step, step)


def story_windows(model, audio, tr_times, context_s=0.0, stride_s=4.0, take="stride", cnn=None):
    """A story as block_inputs reads it: its audio (a tensor) and TR times, its windows
    (feature_windows), where each window's features start among the story's (`offsets`), and the
    frozen CNN's output for each window (window_cnn; cnn: story_cnns', if the caller has it)."""
    windows, times = feature_windows(len(audio), context_s, stride_s, take)
    kept = np.array([k1 - k0 for _, _, k0, k1 in windows])
    return dict(audio=audio, tr_times=tr_times, windows=windows, times=times, cnn=cnn,
                offsets=np.cumsum(kept) - kept, window_cnn=window_cnn(model, audio, windows, cnn))


def load_stories(model, data, names, device, context_s=0.0, stride_s=4.0, take="stride"):
    """Each story of `names` as story_windows gives it, on `device`, the frozen CNN's output computed
    once rather than in every block of every epoch: on the device while it fits in its budget, else
    in pinned host memory."""
    stories, room = {}, memory_budget(device)
    for s in names:
        story_file = load_npz(os.path.join(data, "stories", f"{s}.npz"))
        audio = torch.as_tensor(story_file["audio"], device=device)
        cnn = story_cnns(model, audio, context_s, stride_s, take, data, s)  # once (cached on disk)
        st = story_windows(model, audio, story_file["tr_times"], context_s, stride_s, take, cnn)
        if cnn is None:  # a group-norm CNN's output per window: memory of its own
            room -= sum(c.numel() * c.element_size() for c in st["window_cnn"])
            if room < 0 and torch.device(device).type == "cuda":
                st["window_cnn"] = [c.cpu().pin_memory() for c in st["window_cnn"]]
        stories[s] = st
    return stories


def window_features(story, w0, w1):
    """The first of the story's features that windows w0 .. w1 - 1 keep, and how many."""
    _, _, k0, k1 = story["windows"][w1 - 1]
    return story["offsets"][w0], story["offsets"][w1 - 1] + k1 - k0 - story["offsets"][w0]


def training_blocks(rows, block_trs, history="real"):
    """A run's training examples [(story, i0, i1), ...]: each story ({story: rows}) cut into blocks
    of block_trs TRs, the last shorter. With zero-padded delays (history 'zeros'), a block of one
    row, whose input would be all zeros, is left out (as the authors')."""
    least = 2 if history == "zeros" else 1
    return [(s, i, min(n, i + block_trs)) for s, n in rows.items() for i in range(0, n, block_trs)
            if min(n, i + block_trs) - i >= least]


def block_order(blocks, seed, epoch, order="shuffled"):
    """The order an epoch takes its blocks [(story, i0, i1), ...] in: 'shuffled' across stories,
    anew each epoch (seeded by the seed and the epoch, so a resumed run takes the same); 'stories'
    (the authors'): the stories in one seeded order, the same every epoch, each one's blocks in
    time order."""
    if order == "shuffled":
        return np.random.default_rng(seed * 1000 + epoch).permutation(len(blocks))
    names = np.random.default_rng(seed).permutation(sorted({s for s, _, _ in blocks}))
    rank = {s: i for i, s in enumerate(names)}
    return np.array(sorted(range(len(blocks)), key=lambda j: (rank[blocks[j][0]], blocks[j][1])))
