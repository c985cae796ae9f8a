"""The CUDA path: what a user's GPU run does differently from the CPU tests (bf16 autocast, cuda
tensors). The CUDA cases skip without it (the LoRA step also runs on CPU); bench/gpu_check.sh runs them on a GPU machine."""
import numpy as np
import pytest
import torch

import common

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_ridge_cv_on_cuda_equals_cpu():
    rng = np.random.default_rng(0)
    X = common.zscore(rng.standard_normal((600, 40)).astype(np.float32))
    Y = common.zscore(X @ rng.standard_normal((40, 300)).astype(np.float32) + 3 * rng.standard_normal((600, 300)))
    W_cpu, a_cpu, r_cpu = common.ridge_cv(X, Y, device="cpu")
    W_gpu, a_gpu, r_gpu = common.ridge_cv(X, Y, device="cuda")
    assert np.mean(a_cpu == a_gpu) > 0.99  # float32 sums in another order may flip a near-tie
    same = a_cpu == a_gpu
    np.testing.assert_allclose(W_gpu[:, same], W_cpu[:, same], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(r_gpu, r_cpu, atol=1e-4)


@needs_cuda
def test_bf16_features_on_cuda_are_within_tolerance_of_float32():
    """extract_features runs under bf16 autocast on cuda (8 bits of mantissa): each hidden state
    must still correlate > 0.99 with the float32 CPU features, frame by frame."""
    model = common.load_wavlm("tiny-pretrained")
    audio = np.random.default_rng(0).standard_normal(16000 * 12).astype(np.float32) * 0.1
    ref, _ = common.extract_features(model, audio, context_s=4.0, stride_s=2.0)
    got, _ = common.extract_features(model.to("cuda"), audio, context_s=4.0, stride_s=2.0)
    for a, b in zip(ref, got):
        r = common.pearson_r(a.T, b.T)  # per frame, across hidden units
        assert r.min() > 0.99, r.min()
        assert np.abs(a - b).mean() / a.std() < 0.05


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_one_lora_step_changes_every_adapter(device):
    """Runs on CPU too, so a flaw in the test itself shows here and not first on a lent GPU."""
    torch.manual_seed(0)
    model = common.add_lora(common.load_wavlm("tiny", device=device))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in lora.items()}
    # q/k's lora_A gradients are ~1e-16 at step 2 (B is still ~1e-6 and a random tiny model attends
    # almost uniformly): with Adam's default eps (1e-8) their update would be ~1e-12 and vanish in
    # float32 next to weights of ~0.1 (seen on an H200); a tiny eps makes every step ~lr in size.
    opt = torch.optim.Adam(lora.values(), lr=1e-3, eps=1e-30)
    audio = torch.randn(16000 * 4, device=device) * 0.1
    model.train()
    feats, _ = common.extract_features(model, audio, layers=[3], context_s=0.0, stride_s=2.0, grad=True)
    feats[0].float().pow(2).mean().backward()
    # lora_B starts at zero, so the first step moves B only (A's gradient is B^T times something)
    assert all(p.grad is not None for n, p in lora.items() if "lora_B" in n)
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in lora.items() if "lora_B" in n)
    # a second step: now B is non-zero, so every A gets a gradient and moves too
    opt.zero_grad()
    feats, _ = common.extract_features(model, audio, layers=[3], context_s=0.0, stride_s=2.0, grad=True)
    feats[0].float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in lora.items())
