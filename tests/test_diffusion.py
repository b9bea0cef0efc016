"""
Tests for diffusion.py: schedule, respacing, losses and samplers vs golden vectors made with the reference
DiT code, plus reference-free checks (closed forms, a Gaussian toy problem, RNG order). CPU, a few seconds:
    python -m pytest tests/test_diffusion.py
The three tiny-DiT golden tests (loss, p_mean_variance, DDIM-10) use models.py's DiT.
"""
import math
import os

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, space_timesteps

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
TABLES = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tensors here are tiny: intra-op threads only add overhead, which on a busy 2-core machine made
    # the DDPM-250 test take 18 s instead of 0.8 s. Restored afterwards for other test files.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(GOLDEN, "diffusion_golden.pt"), weights_only=True)


@pytest.fixture(scope="module")
def tiny_dit():
    """The golden tiny DiT (random N(0, 0.05²) weights) in eval mode."""
    import models
    d = torch.load(os.path.join(GOLDEN, "dit_tiny.pt"), weights_only=True)
    model = models.DiT(**d["config"])
    model.load_state_dict(d["state_dict"])
    return model.eval()


def toy_model(C=2, seed=0):
    """A deterministic stand-in for DiT: a 1x1 conv to (ε, v) in (-1, 1) with a t-dependent shift."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(C, 2 * C, 1).requires_grad_(False)
    return lambda x, t, **kw: torch.tanh(conv(x) + 1e-3 * t.float().view(-1, 1, 1, 1))

# -----------------------------------------------------------------------------
# schedule and respacing

def test_schedule_tables_match_golden_exactly(golden):
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == 1000
    assert torch.equal(diffusion.timestep_map, torch.arange(1000))
    for name in TABLES:
        ours = getattr(diffusion, name)
        assert ours.dtype == np.float64, name
        assert np.array_equal(ours, golden[f"schedule/{name}"].numpy()), name  # bitwise: same float64 ops


def test_schedule_matches_dit_md_test_vectors():
    d = create_diffusion("")
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-9)
    assert close(d.alphas_cumprod[0], 0.9999)
    assert close(d.alphas_cumprod[499], 0.0785872429)
    assert close(d.alphas_cumprod[999], 4.0358297654e-05)
    assert close(d.posterior_variance[1], 5.45318766e-05)
    assert close(d.posterior_log_variance_clipped[0], -9.8167251353)  # entry 0 := entry 1
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert close(np.log(d.betas[0]), -9.2103403720)
    assert np.allclose(d.betas, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)


@pytest.mark.parametrize("spec", ["250", "100", "50", "25", "10", "ddim50", "ddim25", "10,15,20"])
def test_space_timesteps_matches_golden(golden, spec):
    assert space_timesteps(1000, spec) == golden[f"respacing/{spec}"].tolist()


def test_space_timesteps_edge_cases():
    assert space_timesteps(1000, "") == space_timesteps(1000, None) == list(range(1000))
    assert space_timesteps(1000, "250")[:4] == [0, 4, 8, 12] and space_timesteps(1000, "250")[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))  # no 999
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(1000, 250) == space_timesteps(1000, [250]) == space_timesteps(1000, "250")
    # steps are round() of a running float sum: for "21" (stride 999/20 = 49.95) ten additions give
    # 499.49999999999994 -> 499, where 10 * 49.95 = 499.5 would round (half to even) to 500
    assert space_timesteps(1000, "21")[10] == 499


def test_respaced_250_betas_and_timestep_map(golden):
    d, full = create_diffusion("250"), create_diffusion("")
    assert d.num_timesteps == 250
    assert d.timestep_map.dtype == torch.int64
    assert torch.equal(d.timestep_map, golden["respaced250/timestep_map"])
    assert np.array_equal(d.betas, golden["respaced250/betas"].numpy())
    assert np.allclose(d.betas[:3], [1.0e-4, 5.9907e-4, 9.1760e-4], rtol=1e-4)  # dit.md §2.5
    assert math.isclose(d.betas[249], 0.0775193, rel_tol=1e-5)
    # the short chain keeps the original ᾱ at every kept step (so also the final one)
    assert np.allclose(d.alphas_cumprod, full.alphas_cumprod[d.timestep_map.numpy()], rtol=1e-12)
    # and its posterior tables are recomputed from the new betas, not looked up from the full chain
    assert math.isclose(d.posterior_variance[1], d.betas[1] * (1 - d.alphas_cumprod[0]) / (1 - d.alphas_cumprod[1]))


@pytest.mark.parametrize("spec", ["abc", "10,x", "0", "-5", "2000", "600,600", "ddim999", "ddim", "ddimx", "25.5"])
def test_bad_respacing_strings_raise(spec):
    with pytest.raises(ValueError, match=r"(?s)" + repr(spec).replace(".", r"\.") + ".*ddimN"):
        create_diffusion(spec)


def test_a_process_of_one_step_is_refused():
    with pytest.raises(ValueError, match="at least 2 steps"):
        create_diffusion("1")  # a valid respacing, but one step leaves no posterior variance to learn

# -----------------------------------------------------------------------------
# forward process and losses

@pytest.mark.parametrize("spec", ["", "250"])
def test_q_sample_matches_closed_form(spec):
    d = create_diffusion(spec)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # the original chain, computed here
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
    a = torch.from_numpy(abar[d.timestep_map[t].numpy()]).view(-1, 1, 1, 1)  # ᾱ at the original steps
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()  # DDPM Eq. 4
    assert torch.allclose(d.q_sample(x0, t, noise).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["", "250"])
def test_default_vlb_weight_reproduces_mse_plus_vb(spec):
    d = create_diffusion(spec)
    model = toy_model()
    torch.manual_seed(1)
    x0, noise = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4)
    t = torch.tensor([0, 1, 2, 7, d.num_timesteps // 2, d.num_timesteps - 1])
    out = d.training_losses(model, x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"} and all(v.shape == (6,) for v in out.values())
    assert torch.equal(out["loss"], out["mse"] + out["vb"])  # bit for bit, as the reference's loss
    assert torch.equal(out["mse"], ((noise - model(d.q_sample(x0, t, noise), d.timestep_map[t])[:, :2]) ** 2).mean((1, 2, 3)))
    # λ is per-step-sum weighted: λ = 0.01 is 10x the VB weight of the default; mse and vb themselves unchanged
    out10 = d.training_losses(model, x0, t, noise=noise, vlb_weight=0.01)
    assert torch.equal(out10["mse"], out["mse"]) and torch.equal(out10["vb"], out["vb"])
    assert torch.allclose(out10["loss"], out["mse"] + 10 * out["vb"], rtol=1e-6)
    assert torch.equal(d.training_losses(model, x0, t, noise=noise, vlb_weight=0.0)["loss"], out["mse"])


def test_model_sees_original_steps_on_respaced_process():
    d = create_diffusion("250")
    seen = []
    def model(x, t, y):
        seen.append(t)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    t = torch.tensor([0, 1, 125, 249])
    d.training_losses(model, torch.zeros(4, 1, 2, 2), t, dict(y=None))
    d.p_sample_loop(model, (1, 1, 2, 2), model_kwargs=dict(y=None))
    assert seen[0].dtype == torch.int64 and seen[0].tolist() == [0, 4, 502, 999]  # timestep_map[125] = 502
    assert [s.item() for s in seen[1:]] == d.timestep_map.flip(0).tolist()  # 999, 995, ..., 4, 0


def test_vb_is_zero_for_the_true_posterior_and_decoder_nll_at_t0():
    # a model that outputs the true noise and v = -1 (log Σ = log β̃, the posterior's own clipped log variance)
    # predicts exactly q(x_{t-1} | x_t, x_0): KL = 0 for t > 0. At t = 0 the mean is x_0 itself (coef1 = 1,
    # coef2 = 0), so with h = (1/255)/σ, σ² = β̃_1 (the clipped entry 0), the decoder NLL in bits is
    # -log2(Φ(h) - Φ(-h)) inside (-0.999, 0.999) and -log2 Φ(h) in the open-ended edge bins at x_0 = ±1.
    d = create_diffusion("")
    torch.manual_seed(0)
    x0 = torch.rand(6, 2, 3, 3) * 1.6 - 0.8  # inside (-0.999, 0.999): the interior bin
    x0[1], x0[2] = -1.0, 1.0
    noise = torch.randn_like(x0)
    model = lambda x, t: torch.cat([noise, -torch.ones_like(noise)], 1)
    out = d.training_losses(model, x0, torch.tensor([0, 0, 0, 1, 500, 999]), noise=noise)
    assert torch.all(out["mse"] == 0)
    assert torch.allclose(out["vb"][3:], torch.zeros(3), atol=1e-5)
    h = (1 / 255) / math.sqrt(d.posterior_variance[1])
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # exact Φ; the code uses the tanh approximation
    expected = [-math.log2(phi(h) - phi(-h)), -math.log2(phi(h)), -math.log2(phi(h))]
    assert np.allclose(out["vb"][:3].numpy(), expected, atol=2e-3), (out["vb"][:3], expected)


def test_vb_gradient_reaches_only_the_variance_output():
    d = create_diffusion("")
    torch.manual_seed(0)
    x0, C = torch.randn(4, 2, 3, 3), 2
    raw = torch.randn(4, 2 * C, 3, 3, requires_grad=True)  # stands in for the network output
    model = lambda x, t: raw
    t = torch.tensor([0, 3, 400, 999])
    out = d.training_losses(model, x0, t)
    (g_vb,) = torch.autograd.grad(out["vb"].sum(), raw, retain_graph=True)
    assert torch.all(g_vb[:, :C] == 0) and g_vb[:, C:].abs().sum(dim=(1, 2, 3)).gt(0).all()  # also at t = 0
    (g_mse,) = torch.autograd.grad(out["mse"].sum(), raw)
    assert torch.all(g_mse[:, C:] == 0) and g_mse[:, :C].abs().sum() > 0


def test_bf16_model_output_is_cast_to_float32_before_the_loss_math():
    # under bf16 autocast the model returns bf16; all loss math must then run in fp32, as if on out.float()
    d, model = create_diffusion(""), toy_model()
    torch.manual_seed(0)
    x0, noise, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4), torch.tensor([0, 500])
    ours = d.training_losses(lambda x, t: model(x, t).bfloat16(), x0, t, noise=noise)
    ref = d.training_losses(lambda x, t: model(x, t).bfloat16().float(), x0, t, noise=noise)
    for k in ref:
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], ref[k]), k


def test_a_model_without_the_learned_variance_is_refused_by_name():
    from models import DiT
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3, learn_sigma=False)
    with pytest.raises(ValueError, match="returns 4 channels for 4-channel inputs: .* learn_sigma=True"):
        create_diffusion("2").ddim_sample_loop(model, (1, 4, 4, 4), model_kwargs=dict(y=torch.tensor([0])))


@pytest.mark.parametrize("spec", ["", "250"])
def test_learned_range_variance_interpolates_logs_without_clamp(spec):
    # IDDPM Eq. 15 with frac = (v + 1)/2 between log β̃ (clipped) and log β of the current chain, v not clamped
    d = create_diffusion(spec)
    t = torch.tensor([0, 1, d.num_timesteps // 2, d.num_timesteps - 1])
    x = torch.randn(4, 1, 2, 2)
    for v in [-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]:
        model = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        out = d.p_mean_variance(model, x, t)
        frac, ti = (v + 1) / 2, t.numpy()
        expected = frac * np.log(d.betas[ti]) + (1 - frac) * d.posterior_log_variance_clipped[ti]
        assert np.allclose(out["log_variance"][:, 0, 0, 0].numpy(), expected, rtol=1e-6), v
        assert torch.allclose(out["variance"], out["log_variance"].exp())

# -----------------------------------------------------------------------------
# golden vectors of the tiny DiT

def test_training_losses_match_golden(golden, tiny_dit):
    d = create_diffusion("")
    with torch.no_grad():
        out = d.training_losses(tiny_dit, golden["loss/x0"], golden["loss/t"], dict(y=golden["loss/y"]), noise=golden["loss/noise"])
    assert golden["loss/t"][0] == 0  # covers the discretised decoder NLL
    for k in ["loss", "mse", "vb"]:
        assert torch.allclose(out[k], golden[f"loss/{k}"], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("name,spec", [("full", ""), ("r250", "250")])
def test_p_mean_variance_matches_golden(golden, tiny_dit, name, spec):
    d = create_diffusion(spec)
    with torch.no_grad():
        out = d.p_mean_variance(tiny_dit, golden["pmv/x_t"], golden[f"pmv_{name}/t"], clip_denoised=False,
                                model_kwargs=dict(y=golden["pmv/y"]))
    for k in ["mean", "variance", "log_variance", "pred_xstart"]:
        assert torch.allclose(out[k], golden[f"pmv_{name}/{k}"], rtol=1e-4, atol=1e-4), k


def test_ddim10_loop_matches_golden(golden, tiny_dit):
    d = create_diffusion("ddim10")
    z = golden["ddim10/z"]
    sample = d.ddim_sample_loop(tiny_dit, z.shape, z, clip_denoised=False, model_kwargs=dict(y=golden["ddim10/y"]))
    assert torch.allclose(sample, golden["ddim10/sample"], rtol=1e-4, atol=1e-4)

# -----------------------------------------------------------------------------
# samplers

def gaussian_oracle(d, mu, s):
    """The exact model for data x_0 ~ N(mu, s²·I): E[ε | x_t] and v giving the exact reverse variance.

    E[ε | x_t] = √(1-ᾱ)(x_t - √ᾱ·mu) / (ᾱs² + 1 - ᾱ). For v: q(x_{t-1} | x_t) is Gaussian here, with variance
    β̃_t + coef1_t²·Var(x_0 | x_t), Var(x_0 | x_t) = s²(1-ᾱ)/(ᾱs² + 1 - ᾱ). v = -1 (β̃ alone) would make DDPM
    shrink the std by ~3% at s = 0.5 (≈ 5 standard errors below), so v places log Σ exactly on that value
    along IDDPM Eq. 15's line between log β̃ and log β of the respaced chain (v is not clamped).
    """
    table = lambda arr: torch.from_numpy(np.asarray(arr, dtype=np.float64))
    a_, pv_, c1_ = table(d.alphas_cumprod), table(d.posterior_variance), table(d.posterior_mean_coef1)
    lo_, hi_ = table(d.posterior_log_variance_clipped), table(np.log(d.betas))
    def model(x, t):
        i = torch.searchsorted(d.timestep_map, t)  # original step -> respaced index
        col = lambda tab: tab[i].view(-1, 1, 1, 1)  # float64
        a = col(a_)
        var_t = a * s**2 + 1 - a
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / var_t
        target = col(pv_) + col(c1_) ** 2 * s**2 * (1 - a) / var_t
        v = 2 * (target.log() - col(lo_)) / (col(hi_) - col(lo_)) - 1
        return torch.cat([eps, v.expand_as(x)], 1).float()
    return model


def ddim_oracle_moments(d, mu, s):
    """Mean and std of the eta = 0 DDIM sample under the oracle, in closed form: every step is linear in x."""
    a, a_prev = d.alphas_cumprod, d.alphas_cumprod_prev
    m, sd = -math.sqrt(a[-1]) * mu, 1.0  # of x_T - √ᾱ_T·mu with x_T ~ N(0, I)
    for i in range(d.num_timesteps - 1, 0, -1):  # Song et al. Eq. 12 with exact x̂_0 and ε̂: d' = k·d
        k = (math.sqrt(a_prev[i] * a[i]) * s**2 + math.sqrt((1 - a_prev[i]) * (1 - a[i]))) / (a[i] * s**2 + 1 - a[i])
        m, sd = k * m, k * sd
    g = math.sqrt(a[0]) * s**2 / (a[0] * s**2 + 1 - a[0])  # last step returns x̂_0 = mu + g·d
    return mu + g * m, g * sd


def test_ddpm_250_recovers_gaussian_data():
    mu, s, n = 0.7, 0.5, 4000 * 1 * 2 * 2  # n iid scalars (the oracle acts per element)
    d = create_diffusion("250")
    torch.manual_seed(0)
    x = d.p_sample_loop(gaussian_oracle(d, mu, s), (4000, 1, 2, 2))
    # with the exact reverse kernel DDPM is exact up to N(0, I) vs the true x_T and x̂_0 at t = 0 (both < 1e-3·s)
    assert abs(x.mean().item() - mu) < 5 * s / math.sqrt(n)  # 5 standard errors of the mean
    assert abs(x.std().item() - s) < 5 * s / math.sqrt(2 * n)  # ~5 standard errors of the std


def test_ddim_50_recovers_gaussian_data():
    mu, s, n = 0.7, 0.5, 4000 * 1 * 2 * 2
    d = create_diffusion("ddim50")
    m, sd = ddim_oracle_moments(d, mu, s)
    assert abs(m - mu) < 0.01 and abs(sd - s) < 0.06 * s  # DDIM-50's own discretisation error (std -5.5% here)
    torch.manual_seed(0)
    x = d.ddim_sample_loop(gaussian_oracle(d, mu, s), (4000, 1, 2, 2))
    assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n)
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop", "dpm_solver_sample_loop", "sde_dpm_solver_sample_loop"])
def test_sampler_is_deterministic_given_seed(loop):
    d, model = create_diffusion("10"), toy_model()
    sample = lambda seed: (torch.manual_seed(seed), getattr(d, loop)(model, (2, 2, 4, 4)))[1]
    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop", "dpm_solver_sample_loop", "sde_dpm_solver_sample_loop"])
def test_progress_bar_counts_every_step(loop, capsys):
    d = create_diffusion("10")
    getattr(d, loop)(toy_model(), (1, 2, 4, 4), progress=True)
    assert "10/10" in capsys.readouterr().err


def test_ddpm_draws_noise_in_reference_order():
    # the model draws random numbers itself (as DiT's label dropout would), so the order of the model call
    # and the step noise is visible in the samples: the reference calls the model first, then randn_like(x)
    d, base = create_diffusion("10"), toy_model()
    model = lambda x, t: base(x, t) + 0.1 * torch.randn(1)
    shape = (2, 2, 4, 4)
    torch.manual_seed(0)
    x = torch.randn(*shape)
    for i in reversed(range(10)):
        t = torch.full((2,), i)
        out = d.p_mean_variance(model, x, t)
        z = torch.randn_like(x)  # drawn at every step, also at i = 0 where it is multiplied by 0
        x = out["mean"] + (i > 0) * torch.exp(0.5 * out["log_variance"]) * z
    by_hand_state = torch.get_rng_state()
    torch.manual_seed(0)
    sample = d.p_sample_loop(model, shape)
    assert torch.equal(sample, x)
    assert torch.equal(torch.get_rng_state(), by_hand_state)  # so the t = 0 draw happened too
    # a given start noise is used as is, without drawing one
    torch.manual_seed(0)
    z0 = torch.randn(*shape)
    assert torch.equal(d.p_sample_loop(model, shape, noise=z0), sample)


def test_ddim_draws_one_noise_per_step_even_with_eta_zero():
    d, model = create_diffusion("ddim10"), toy_model()
    torch.manual_seed(0)
    d.ddim_sample_loop(model, (2, 2, 4, 4))
    state = torch.get_rng_state()
    torch.manual_seed(0)
    for _ in range(1 + 10):  # start noise + one randn_like per step
        torch.randn(2, 2, 4, 4)
    assert torch.equal(state, torch.get_rng_state())
    # eta = 0 is deterministic given the start noise; eta = 1 is not
    z = torch.randn(2, 2, 4, 4)
    assert torch.equal(d.ddim_sample_loop(model, z.shape, z), d.ddim_sample_loop(model, z.shape, z))
    assert not torch.equal(d.ddim_sample_loop(model, z.shape, z, eta=1.0), d.ddim_sample_loop(model, z.shape, z, eta=1.0))


def test_ddim_rederives_eps_from_the_clipped_x0():
    # with clip_denoised=True the DDIM step must use ε implied by the clipped x̂_0, not the model's ε
    d, base = create_diffusion("ddim10"), toy_model()
    model = lambda x, t: base(x, t) * 3  # |ε| up to 3: x̂_0 leaves [-1, 1] and gets clipped
    torch.manual_seed(0)
    z = torch.randn(2, 2, 4, 4)
    a = torch.from_numpy(d.alphas_cumprod)
    x = z.double()
    for i in reversed(range(10)):
        out = d.p_mean_variance(model, x.float(), torch.full((2,), i), clip_denoised=True)
        x0 = out["pred_xstart"].double()
        eps = (x - a[i].sqrt() * x0) / (1 - a[i]).sqrt()  # from x_t = √ᾱ·x_0 + √(1-ᾱ)·ε
        a_prev = a[i - 1] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # Song et al. Eq. 12, eta = 0
        assert out["pred_xstart"].abs().max() == 1  # clipping is active at every step
    assert torch.allclose(d.ddim_sample_loop(model, z.shape, z, clip_denoised=True), x.float(), atol=1e-4)


def test_clip_denoised_clamps_pred_xstart():
    d, model = create_diffusion("10"), toy_model()
    x, t = 50 * torch.randn(2, 2, 4, 4), torch.full((2,), 9)
    free, clipped = d.p_mean_variance(model, x, t), d.p_mean_variance(model, x, t, clip_denoised=True)
    assert free["pred_xstart"].abs().max() > 1 and clipped["pred_xstart"].abs().max() <= 1
    assert torch.equal(clipped["pred_xstart"], free["pred_xstart"].clamp(-1, 1))

# -----------------------------------------------------------------------------
# DPM-Solver++(2M)

def smooth_model(C=3, mu=0.3, s=0.5, cfg_scale=None):
    """A smooth deterministic model of (x, t) that samples like a real one: the exact ε of data N(mu, s²) plus a nonlinear,
    t-dependent term, and junk in the v channels. With cfg_scale it acts as forward_with_cfg on a doubled batch: both halves
    get uncond + scale·(cond - uncond) at the first half's x, with an unconditional model that lacks the extra term."""
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))  # the original chain, computed here
    def eps(x, t, extra):
        a, xd = abar[t].view(-1, 1, 1, 1), x.double()
        e = (1 - a).sqrt() * (xd - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return (e + extra * torch.tanh(xd.roll(1, 1)) * torch.cos(t.view(-1, 1, 1, 1) / 150.0)).float()
    def model(x, t):
        assert x.shape[1] == C
        if cfg_scale is None:
            return torch.cat([eps(x, t, 0.1), torch.sin(x)], 1)
        half, n = x[: len(x) // 2], len(x) // 2
        guided = eps(half, t[:n], 0.0) + cfg_scale * (eps(half, t[:n], 0.1) - eps(half, t[:n], 0.0))
        return torch.cat([torch.cat([guided, guided]), torch.sin(x)], 1)
    return model


def diffusers_dpm_solver(timesteps, model, x, noises=None):
    """The sample of diffusers' DPMSolverMultistepScheduler configured as ours (the options that matter are spelled out);
    with noises, its SDE variant ("sde-dpmsolver++") fed our step noises in order.

    Ours calls the model at every kept step, the last call at step 0 returning x_θ. In diffusers terms that is 2M over the kept
    steps but 0 with final_sigmas_type="sigma_min" (σ_min is σ at step 0), its last step first order (euler_at_final=True;
    lower_order_final=True does the same below 15 steps), then one first-order step from step 0 to σ = 0, which returns x_θ
    (DPM-Solver's denoise_to_zero): a second scheduler with timesteps=[0] and final_sigmas_type="zero".
    """
    from diffusers import DPMSolverMultistepScheduler
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
                  algorithm_type="dpmsolver++" if noises is None else "sde-dpmsolver++", solver_order=2, solver_type="midpoint",
                  thresholding=False, euler_at_final=True,
                  variance_type=None)  # variance_type="learned_range" would keep ε channels [:3] only: we pass ε instead
    noises = iter(noises or [])
    for steps, final in [(timesteps[:-1], "sigma_min"), ([0], "zero")]:
        sched = DPMSolverMultistepScheduler(final_sigmas_type=final, **common)
        sched.set_timesteps(timesteps=steps)
        for t in sched.timesteps:
            x = sched.step(model(x, t.repeat(len(x)))[:, : x.shape[1]], t, x, variance_noise=next(noises, None)).prev_sample
    return x


@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("n", [5, 7, 10, 15, 20, 25])
def test_dpm_solver_matches_diffusers_multistep(n, cfg, sde):
    pytest.importorskip("diffusers", reason="diffusers is the reference (requirements-test.txt)")
    d = create_diffusion(str(n))
    model = smooth_model(cfg_scale=4.0 if cfg else None)
    torch.manual_seed(0)
    z = torch.randn(4, 3, 4, 4)
    z = torch.cat([z, z]) if cfg else z  # sample.py's CFG batch: [cond half; uncond half]
    torch.manual_seed(1)
    ours = (d.sde_dpm_solver_sample_loop if sde else d.dpm_solver_sample_loop)(model, z.shape, z)
    torch.manual_seed(1)
    noises = [torch.randn_like(z) for _ in range(n)] if sde else None  # the SDE draws one after each model call, the last unused
    ref = diffusers_dpm_solver(d.timestep_map.flip(0).tolist(), model, z.clone(), noises)
    # diffusers' σ table is float32, ours float64: measured max |ours - ref| / max |ref| <= 2.2e-6 (SDE: 2.9e-6) for 5-50 steps
    # (8.5e-6 at 3-4 steps); with diffusers' σ table set to our float64 values it is <= 5e-7, so the rest is that rounding
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    if sde:
        assert not torch.allclose(ours, d.dpm_solver_sample_loop(model, z.shape, z), atol=1e-2)  # the noise is really there
    elif cfg:
        assert torch.equal(ours[:4], ours[4:])  # both halves carry the same guided ε

@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_is_ddim_where_every_step_is_first_order(clip):
    # the first step (no x_θ history) and the step onto step 0 are first order, i.e. DDIM (Lu et al.); with 2 or 3
    # steps there are no others. Also checks clip_denoised: a clipped x_θ is used as is, and DDIM re-derives ε from it.
    base = toy_model(C=2)
    model = lambda x, t: base(x, t) * 3  # x̂_0 leaves [-1, 1] and gets clipped
    torch.manual_seed(0)
    z = torch.randn(2, 2, 4, 4)
    for n in [2, 3]:
        d = create_diffusion(str(n))
        assert torch.allclose(d.dpm_solver_sample_loop(model, z.shape, z, clip), d.ddim_sample_loop(model, z.shape, z, clip), atol=1e-5)
    d = create_diffusion("4")  # one second-order step
    assert not torch.allclose(d.dpm_solver_sample_loop(model, z.shape, z, clip), d.ddim_sample_loop(model, z.shape, z, clip), atol=1e-3)


def test_dpm_solver_calls_the_model_once_per_step_and_ignores_v():
    d = create_diffusion("25")
    seen = []
    def model(x, t, y):
        seen.append(t)
        return torch.cat([0.5 * x, torch.full_like(x, float("nan"))], 1)  # v is NaN: the solver must not touch it
    torch.manual_seed(0)
    z = torch.randn(2, 1, 2, 2)
    state = torch.get_rng_state()
    x = d.dpm_solver_sample_loop(model, z.shape, z, model_kwargs=dict(y=None))
    assert torch.isfinite(x).all()
    assert [s.tolist() for s in seen] == [[s, s] for s in d.timestep_map.flip(0).tolist()]  # 25 calls at 999, ..., 0
    assert torch.equal(torch.get_rng_state(), state)  # deterministic: with the start noise given, nothing is drawn


def test_dpm_solver_20_recovers_gaussian_data_tighter_than_ddim():
    # on data N(mu, s²) the exact ε is affine in x_t and so is every solver step: the sample of start points 0 and 1 gives the
    # exact mean and std of the output for x_T ~ N(0, I) (no Monte Carlo error). The exact flow from N(0, I) at step 999 would
    # give mean mu - 0.0022 (x_T is not exactly the forward marginal) and std s within 2e-5.
    mu, s = 0.7, 0.5
    d = create_diffusion("20")
    oracle = gaussian_oracle(d, mu, s)
    moments = lambda x: (x[0].item(), (x[1] - x[0]).item())
    z = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    m, sd = moments(d.dpm_solver_sample_loop(oracle, z.shape, z).flatten())
    m_ddim, sd_ddim = moments(d.ddim_sample_loop(oracle, z.shape, z).flatten())
    assert abs(m - mu) < 0.004 and abs(sd - s) < 0.05 * s  # measured: mean -0.0021 (the flow's own -0.0022), std -4.7%
    assert abs(sd - s) < abs(sd_ddim - s) / 2.5  # DDIM-20 on the same steps: std -13.9%
    # and the sampler run as usual on 16k scalars agrees with those moments
    torch.manual_seed(0)
    x = d.dpm_solver_sample_loop(oracle, (4000, 1, 2, 2))
    n = x.numel()
    assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n) and abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n)


@pytest.mark.parametrize("spec,n", [("10,15,20", 45), ("5,10,10", 25), ("3,3,4", 10)])
def test_dpm_solver_rejects_uneven_respacings(spec, n):
    d = create_diffusion(spec)
    with pytest.raises(ValueError, match=f"DPM-Solver\\+\\+ needs evenly spaced steps.*plain step count like '{n}' instead"):
        d.dpm_solver_sample_loop(toy_model(C=1), (1, 1, 2, 2))


@pytest.mark.parametrize("spec", ["", "21", "25", "ddim25", "250,250,250,250"])
def test_dpm_solver_takes_even_respacings(spec):
    d = create_diffusion(spec)  # "21": gaps of 49 and 50 (rounding); "250,250,250,250": all 1000 steps
    torch.manual_seed(0)
    assert torch.isfinite(d.dpm_solver_sample_loop(toy_model(C=1), (1, 1, 2, 2))).all()

# -----------------------------------------------------------------------------
# SDE-DPM-Solver++(2M)

def test_sde_dpm_solver_is_ddpm_with_the_small_variance_where_every_step_is_first_order():
    # a first-order SDE step from x_i is the posterior q(x_{i-1} | x_i, x_θ) with variance β̃: what DDPM does with v = -1.
    # With 2 or 3 steps every step is first order; the same seed gives the same noise, drawn in the same order.
    base = toy_model(C=2)
    model = lambda x, t: torch.cat([base(x, t)[:, :2], -torch.ones_like(x)], 1)
    torch.manual_seed(0)
    z = torch.randn(2, 2, 4, 4)
    for n in [2, 3]:
        d = create_diffusion(str(n))
        torch.manual_seed(1)
        sde = d.sde_dpm_solver_sample_loop(model, z.shape, z)
        state = torch.get_rng_state()
        torch.manual_seed(1)
        ddpm = d.p_sample_loop(model, z.shape, z)
        assert torch.allclose(sde, ddpm, atol=1e-4) and not torch.allclose(sde, d.dpm_solver_sample_loop(model, z.shape, z), atol=1e-2)
        assert torch.equal(state, torch.get_rng_state())  # one randn_like per step, as DDPM draws them


def test_sde_dpm_solver_250_recovers_gaussian_data():
    # with the exact ε of data N(mu, s²) the reverse SDE's only error is the step size. Measured std at 10 / 20 / 50 / 250 steps:
    # -27% / -3.4% / +2.6% / +0.2% (the ODE solver: -21% / -4.3% / +0.8% / +0.5%): on an exact model noise buys nothing at few
    # steps; what it is for is correcting a model's own errors, which an ODE carries to the end
    mu, s = 0.7, 0.5
    d = create_diffusion("250")
    torch.manual_seed(0)
    x = d.sde_dpm_solver_sample_loop(gaussian_oracle(d, mu, s), (4000, 1, 2, 2))
    n = x.numel()
    assert abs(x.mean().item() - mu) < 5 * s / math.sqrt(n) and abs(x.std().item() - s) < 5 * s / math.sqrt(2 * n)
