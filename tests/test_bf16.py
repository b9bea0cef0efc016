"""
Every bf16 path a GPU user takes, run on the CPU whatever it is (CPU autocast works everywhere, slowly without
AVX512-BF16/AMX): training with frozen weights stored in bf16, resume, merge and delta export, sampling (grid, FID
set, bank), the VAE, and the measures, which stay fp32; and the CPU's own bf16 attention path. Tiny models, so
seconds even without native bf16.

    python -m pytest tests/test_bf16.py
"""
import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

import difffit
import fid
import models
import sample
import train

def run(tmp_path, base, *extra):
    args = train.parser.parse_args(["--ckpt", base, "--results-dir", str(tmp_path / "results"), "--global-batch-size", "4",
                                    "--log-every", "1", "--sample-steps", "2", "--precision", "bf16", "--eval-per-class", "0", *extra])
    return train.main(args)

@pytest.mark.parametrize("method", ["difffit", "lora-r8", "full"])
def test_frozen_weights_stored_in_bf16_compute_what_autocast_computes(base, method):
    """Storing the frozen weights in bf16 once is exactly autocast's per-step cast: same loss, same gradients."""
    recast = models.load_model(base)[0]
    difffit.apply(recast, difffit.make_spec(recast, method, 8))
    stored = difffit.store_frozen(copy.deepcopy(recast), torch.bfloat16)  # the same LoRA init
    frozen = [p for p in stored.parameters() if p.dtype == torch.bfloat16]
    assert all(not p.requires_grad for p in frozen) and (frozen or method == "full")
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)  # fp32 masters
    diffusion = train.create_diffusion("")
    x, t, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 8])
    out = []
    for m in (recast, stored):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion.training_losses(m.train(), x, t, dict(y=y))["loss"].mean()
        loss.backward()
        out.append((loss, {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(g, out[1][1][k]) for k, g in out[0][1].items())

def test_bf16_forward_follows_gamma_steps_smaller_than_bf16s_resolution(base):
    """γ near 1 moves in steps of ~1e-3; as a bf16 number it could only take steps of 2**-7 above 1 (0.8%), so a forward
    that multiplied by bf16 γ would not see what the fp32 master holds."""
    model = models.load_model(base)[0]
    difffit.apply(model, difffit.make_spec(model, "difffit", 8))
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.tensor([0, 1])
    def out(qkv, final):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.fill_(qkv) if n.endswith("gamma_qkv") else p.fill_(final) if n == "final_layer.gamma" else None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x, t, y).float()
    one = out(1.0, 1.0)
    assert not torch.equal(out(1.003, 1.0), one)
    torch.testing.assert_close(out(1.0, 1.003), one * 1.003)  # the final γ alone scales the output

def test_bf16_run_resumes_exactly_and_exports_fp32(tmp_path, base):
    straight = run(tmp_path / "a", base, "--max-steps", "4", "--ckpt-every", "2")
    run(tmp_path / "b", base, "--max-steps", "2", "--ckpt-every", "2")
    resumed = train.main(train.parser.parse_args(["--resume", str(tmp_path / "b" / "results" / "000-toy-difffit"), "--max-steps", "4"]))
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, resumed))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert "--precision bf16: bf16 autocast" in open(os.path.join(straight, "log.txt")).read()  # what was chosen is logged
    # the delta and the merged model keep fp32, and base + delta in fp32 is the merged model
    delta = difffit.read_delta(os.path.join(straight, "delta.safetensors"))
    assert all(v.dtype == torch.float32 for v in delta["params"].values())
    merged, _, _ = models.load_model(os.path.join(straight, "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in merged.state_dict().values())
    fp32, _ = difffit.load(delta)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), torch.tensor([1, 8])
    torch.testing.assert_close(merged.eval()(x, t, y), fp32.eval()(x, t, y), rtol=1e-5, atol=1e-6)

def test_sampling_in_bf16_writes_the_same_formats(tmp_path, base):
    """Grid, FID set and bank under --precision bf16: uint8 PNGs, the ADM .npz and a float32 bank, as in fp32."""
    common = ["--ckpt", base, "--steps", "2", "--precision", "bf16", "--batch-size", "3"]
    sample.main(sample.parser.parse_args(common + ["--out", str(tmp_path / "grid.png")]))
    sample.main(sample.parser.parse_args(common + ["--num-fid-samples", "5", "--fid-dir", str(tmp_path / "fid")]))
    sample.main(sample.parser.parse_args(common + ["--num-bank-samples", "5", "--out", str(tmp_path / "bank.npy")]))
    arr = np.load(tmp_path / "fid.npz")["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8
    bank = np.load(tmp_path / "bank.npy")
    assert bank.shape == (5, 3, 32, 32) and bank.dtype == np.float32 and np.isfinite(bank).all()
    for sampler in ("ddpm", "ddim", "dpm++", "sde-dpm++"):  # each grid: the fp32 grid's picture, up to bf16's rounding
        grids = []
        for precision in ("fp32", "bf16"):
            out = str(tmp_path / f"{sampler}-{precision}.png")
            sample.main(sample.parser.parse_args(common[:-4] + ["--precision", precision, "--batch-size", "3", "--sampler", sampler, "--out", out]))
            grids.append(Image.open(out))
        assert grids[1].mode == "RGB" and grids[1].size == grids[0].size == Image.open(tmp_path / "grid.png").size
        a, b = (np.asarray(g, dtype=np.float64) for g in grids)
        assert np.abs(a - b).mean() < 4 < a.std(), sampler  # measured 0.3 against a spread of 120 (a random tiny model's noise)

def test_vae_under_bf16_autocast_returns_fp32_close_to_fp32():
    torch.manual_seed(0)
    vae = models.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, std = vae.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean16, std16 = vae.encode(x)
            img16 = vae.decode(mean16)
        img = vae.decode(mean)
    assert mean16.dtype == std16.dtype == img16.dtype == torch.float32
    for a, b in ((mean16, mean), (img16, img)):
        assert ((a - b).norm() / b.norm()).item() < 0.05  # bf16 has 8 bits of mantissa

def test_fid_features_stay_fp32_inside_a_bf16_autocast():
    torch.manual_seed(0)
    net = fid.FIDInception().eval()
    images = np.random.RandomState(0).randint(0, 255, (2, 40, 40, 3), np.uint8)
    plain = fid.get_features(images, "legacy_pytorch", net, batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fid.get_features(images, "legacy_pytorch", net, batch_size=2)
    assert np.array_equal(plain, inside)

@pytest.mark.parametrize("tokens", [64, 256, 576])
def test_cpu_bf16_training_attention_rounds_near_the_fused_kernel_and_is_it_elsewhere(tokens):
    """Training in bf16 on a CPU, models.attention runs as three ops (faster than the CPU flash kernel's backward
    there). Their bf16 scores round a sharp softmax more than the fused kernel's fp32 ones: within 2.5x its error
    against float64 (a wrong scale or transpose is off by O(1))."""
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, tokens, 64) * s for s in (2, 2, 1, 1))  # peaky weights: a hard softmax
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*exact)
    out.backward(grad.double())
    errors = {}
    for name, fn in (("fused", torch.nn.functional.scaled_dot_product_attention), ("ours", models.attention)):
        qkv = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        o = fn(*qkv)
        o.backward(grad.bfloat16())
        errors[name] = [((a.double() - b).norm() / b.norm()).item() for a, b in zip([o] + [t.grad for t in qkv], [out] + [t.grad for t in exact])]
    assert all(e < 2.5 * f for e, f in zip(errors["ours"], errors["fused"])), errors
    # everywhere else (fp32, inference, longer sequences) it is the fused kernel itself
    longer = [torch.randn(1, 2, 577, 64).bfloat16().requires_grad_() for _ in range(3)]
    for args in ((q, k, v), [t.bfloat16() for t in (q, k, v)], longer):
        assert torch.equal(models.attention(*args), torch.nn.functional.scaled_dot_product_attention(*args))

@pytest.mark.parametrize("native", [True, False])
def test_precision_note_says_what_was_chosen_and_warns_of_emulated_bf16(monkeypatch, native):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    assert models.bf16_chosen("auto", cpu) == native and models.bf16_chosen("bf16", cpu) and not models.bf16_chosen("fp32", cpu)
    auto, bf16, fp32 = (models.precision_note(p, cpu) for p in ("auto", "bf16", "fp32"))
    assert auto.startswith("--precision auto: bf16 autocast on cpu" if native else "--precision auto: fp32 on cpu")
    assert bf16.startswith("--precision bf16: bf16 autocast on cpu") and fp32.startswith("--precision fp32: fp32 on cpu")
    assert ("warning" in bf16) == (not native) and "warning" not in auto + fp32  # only bf16 asked of a CPU without it

def test_auto_leaves_a_gpu_that_only_emulates_bf16_in_fp32(monkeypatch):
    # torch.cuda.is_bf16_supported() is True on pre-Ampere GPUs too, where bf16 is emulated; native means Ampere on
    gpu = torch.device("cuda:0")
    for capability, native in ((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True):  # V100, T4, A100, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert models.native_bf16(gpu) == models.bf16_chosen("auto", gpu) == native and models.bf16_chosen("bf16", gpu)
        assert ("warning" in models.precision_note("bf16", gpu)) == (not native)
