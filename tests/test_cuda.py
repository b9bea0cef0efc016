"""
The GPU paths: bf16 training with fused AdamW, flash attention, torch.compile, sampling and FID features on CUDA.
They skip themselves without a GPU; `.ci/gpu` runs them together with the XL/2 benchmark.

    python -m pytest tests/test_cuda.py
"""
import os

import numpy as np
import pytest
import torch

import difffit
import fid
import sample
import train
from models import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def test_training_on_cuda_picks_bf16_and_its_delta_loads_on_cpu(tmp_path, base):
    run_dir = train.main(train.parser.parse_args(["--ckpt", base, "--results-dir", str(tmp_path), "--global-batch-size", "8",
                                                  "--max-steps", "3", "--sample-steps", "2", "--eval-per-class", "0"]))
    assert "--precision auto: bf16 autocast" in open(os.path.join(run_dir, "log.txt")).read()
    model, _ = difffit.load(os.path.join(run_dir, "delta.safetensors"))  # on the CPU, in fp32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())

def test_a_run_begun_on_the_cpu_resumes_on_cuda(tmp_path, base, monkeypatch):
    flags = ["--ckpt", base, "--results-dir", str(tmp_path), "--global-batch-size", "8", "--sample-steps", "2", "--eval-per-class", "0"]
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        run_dir = train.main(train.parser.parse_args(flags + ["--max-steps", "2"]))  # its checkpoint has no CUDA RNG state
    train.main(train.parser.parse_args(["--resume", run_dir, "--max-steps", "3"]))
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "1 x cpu" in log and "1 x cuda:0" in log and "step      3/3" in log

def test_dit_attention_runs_on_flash_sdpa_in_bf16(base):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = load_model(base)[0].cuda().eval()
    x, t, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.tensor([0, 1, 500, 999], device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot run these shapes
            flash = model(x, t, y)
        with sdpa_kernel(SDPBackend.MATH):
            math = model(x, t, y)
    assert ((flash - math).norm() / math.norm()).item() < 1e-2

def test_compiled_model_matches_eager(base, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # train.main turns TF32 on for the whole process
    model = load_model(base)[0].cuda().eval()
    x, t, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.tensor([0, 1, 500, 999], device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-5)

def test_cuda_sampling_is_deterministic_given_seed(base):
    model = load_model(base)[0].cuda().eval()
    diffusion = sample.make_diffusion("dpm++", "5")
    a, b = (sample.generate(model, diffusion, [0, 1, 2], 4.0, seed=3, sampler="dpm++") for _ in range(2))
    assert torch.equal(a, b)

def test_fid_features_on_cuda_match_the_cpu():
    torch.manual_seed(0)
    net = fid.FIDInception().eval()
    images = np.random.RandomState(0).randint(0, 255, (4, 64, 64, 3), np.uint8)
    cpu = fid.get_features(images, "legacy_pytorch", net, batch_size=4)
    gpu = fid.get_features(images, "legacy_pytorch", net.cuda(), batch_size=4, device="cuda")  # TF32 off inside
    assert np.abs(cpu - gpu).max() < 1e-3 * max(np.abs(cpu).max(), 1)
