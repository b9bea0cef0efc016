"""
Gaussian diffusion as DiT uses it: linear betas, q_sample, the hybrid loss, timestep respacing and the
ancestral (DDPM) and DDIM samplers, re-implemented from scratch to match the reference numerically
(float64 tables, float32 lookups, the same RNG order when sampling), plus DPM-Solver++(2M) for few steps, for the
probability-flow ODE and for the reverse SDE.
Papers: DDPM (Ho et al. 2020, arXiv:2006.11239), Improved DDPM = IDDPM (Nichol & Dhariwal 2021,
arXiv:2102.09672), DDIM (Song et al. 2020, arXiv:2010.02502), DiT (Peebles & Xie 2022, arXiv:2212.09748),
DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095).
Only what DiT-XL/2 uses is here: linear schedule, ε-prediction, learned-range variance (no enums, no flags).
"""
import math

import numpy as np
import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# respacing: which of the original T steps a shorter process keeps (IDDPM §4)

def space_timesteps(num_timesteps, spec):
    """Sorted original steps kept by a respacing like "", "250", "10,15,20" or "ddim50" (the reference returns a set)."""
    forms = (f"expected '' or None (all {num_timesteps} steps), a step count like '250', comma-separated "
             f"section counts like '10,15,20', or 'ddimN' like 'ddim50'")
    if spec is None or spec == "":
        return list(range(num_timesteps))
    if isinstance(spec, str) and spec.startswith("ddim"):
        # DDIM-style: the smallest integer stride giving exactly N steps; starts at 0, may miss T-1
        n = int(spec[4:]) if spec[4:].isdigit() else -1
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == n:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"timestep_respacing {spec!r}: no integer stride gives exactly that many of "
                         f"{num_timesteps} steps; {forms}")
    try:
        counts = [int(c) for c in (spec if isinstance(spec, (list, tuple)) else str(spec).split(","))]
    except ValueError:
        raise ValueError(f"timestep_respacing {spec!r} not understood; {forms}") from None
    # split T into len(counts) equal sections (leftover steps go to the first sections), then take
    # count[i] evenly spaced steps from section i, both section ends included
    size, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        n = size + (i < extra)
        if not 1 <= count <= n:
            raise ValueError(f"timestep_respacing {spec!r}: cannot take {count} steps from a section of {n}; {forms}")
        stride = (n - 1) / (count - 1) if count > 1 else 1
        x = 0.0  # a running float sum, as the reference, not j * stride: for "21" step 10 is 499.49999999999994 -> 499
        for _ in range(count):
            steps.append(start + round(x))  # Python round(): half to even, as the reference ("25": 166.5 -> 166)
            x += stride
        start += n
    return sorted(set(steps))

# -----------------------------------------------------------------------------
# small helpers

def _mean_flat(x):
    return x.mean(dim=list(range(1, x.dim())))  # (N,): mean over C, H, W

def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))  # tanh approximation of Φ

def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element for N(mean, exp(log_scale)^2) integrated over a 2/255-wide bin (DDPM Eq. 13, data in [-1, 1])."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # bin [-inf, -1 + 1/255] at the low edge
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # bin [1 - 1/255, inf] at the high edge
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))

# -----------------------------------------------------------------------------
# the diffusion process

class GaussianDiffusion:
    """The process over kept steps `timesteps` (None = all) of a base schedule `betas`; tables are float64 numpy."""

    def __init__(self, betas, timesteps=None):
        betas = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(betas)  # T of the base process (1000), used to weight the VB term
        timesteps = list(range(len(betas))) if timesteps is None else sorted(timesteps)
        if len(timesteps) < 2:
            raise ValueError(f"a diffusion process needs at least 2 steps, got {len(timesteps)}")
        # respacing (IDDPM §4): β'_i = 1 - ᾱ[s_i] / ᾱ[s_{i-1}] with ᾱ before the first kept step = 1. The
        # reference does this even when all steps are kept, so β' may differ from `betas` in the last ulp.
        abar = np.cumprod(1.0 - betas)[timesteps]
        self.betas = 1.0 - abar / np.append(1.0, abar[:-1])
        self.num_timesteps = len(self.betas)
        self.timestep_map = torch.tensor(timesteps, dtype=torch.int64)  # respaced index -> original step
        # everything below is recomputed for the (possibly short) chain
        b = self.betas
        self.alphas_cumprod = np.cumprod(1.0 - b)  # ᾱ_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # ᾱ_{t-1}, = 1 at t = 0
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        # posterior q(x_{t-1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t), DDPM Eq. 6-7
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)  # β̃_t, = 0 at t = 0
        # log β̃ with entry 0 (= log 0) replaced by entry 1, as the reference
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)  # upper end of the learned variance range, of THIS (respaced) chain
        self._tables = {}  # (name, device) -> the table as a tensor there, made on first use (_on)

    def _on(self, name, device):
        """Table `name` as a tensor on `device`, copied there once: the reference copies it at every lookup,
        a host-to-device copy (and a sync on GPUs) ~10 times per step. float64 becomes float32, as in the
        reference's lookups (which cast after indexing: the same values)."""
        key = (name, device)
        if key not in self._tables:
            table = torch.as_tensor(getattr(self, name))
            self._tables[key] = (table.float() if table.dtype == torch.float64 else table).to(device)
        return self._tables[key]

    def _at(self, name, t, x):
        """Table `name` at steps t, float32, shaped (N, 1, 1, ...) to broadcast against x."""
        return self._on(name, t.device)[t].view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x_start, t, noise=None):
        """x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε (DDPM Eq. 4); t are (respaced) indices."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return self._at("sqrt_alphas_cumprod", t, x_start) * x_start + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise

    def _q_posterior(self, x_start, x_t, t):
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM Eq. 7)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x_start + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_log_variance_clipped", t, x_t)

    def _model(self, model, x, t, model_kwargs):
        """Run the model at the ORIGINAL steps timestep_map[t]; split its float32 output into (ε, v)."""
        out = model(x, self._on("timestep_map", t.device)[t], **(model_kwargs or {}))
        out = out.float()  # the loss math runs in fp32 even under bf16 autocast (a no-op in fp32)
        C = x.shape[1]
        if out.shape[1] != 2 * C:
            raise ValueError(f"the model returns {out.shape[1]} channels for {C}-channel inputs: this diffusion needs ε and the learned "
                             f"variance v, 2 x {C} (a DiT with learn_sigma=True, as every published one)")
        return out[:, :C], out[:, C:]

    def _p_from_output(self, eps, v, x, t, clip_denoised):
        """p(x_{t-1} | x_t) from the model's ε and v."""
        # learned-range variance, IDDPM Eq. 15: log Σ = frac·log β_t + (1 - frac)·log β̃_t with frac = (v + 1)/2,
        # not clamped, both ends from this (possibly respaced) chain
        min_log, max_log = self._at("posterior_log_variance_clipped", t, x), self._at("log_betas", t, x)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        # x_0 from ε by inverting DDPM Eq. 4, then the posterior mean at that x_0 (DDPM Eq. 7)
        x0 = self._at("sqrt_recip_alphas_cumprod", t, x) * x - self._at("sqrt_recipm1_alphas_cumprod", t, x) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self._q_posterior(x0, x, t)
        return dict(mean=mean, variance=torch.exp(log_var), log_variance=log_var, pred_xstart=x0)

    def p_mean_variance(self, model, x, t, clip_denoised=False, model_kwargs=None):
        """Mean, variance, log_variance and pred_xstart of p(x_{t-1} | x_t); t are respaced indices."""
        eps, v = self._model(model, x, t, model_kwargs)
        return self._p_from_output(eps, v, x, t, clip_denoised)

    # -------------------------------------------------------------------------
    # training

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, vlb_weight=0.001):
        """Per-sample hybrid loss dict(loss, mse, vb), each (N,); t are respaced indices (0..num_timesteps-1)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        eps, v = self._model(model, x_t, t, model_kwargs)
        mse = _mean_flat((noise - eps) ** 2)  # L_simple, DDPM Eq. 14
        # VB term: ε is detached so L_vlb trains only the variance output v (IDDPM §3.1)
        p = self._p_from_output(eps.detach(), v, x_t, t, clip_denoised=False)
        true_mean, true_log_var = self._q_posterior(x_start, x_t, t)
        # t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) between diagonal Gaussians, in bits/dim
        m, lv = p["mean"], p["log_variance"]
        kl = 0.5 * (-1.0 + lv - true_log_var + torch.exp(true_log_var - lv) + (true_mean - m) ** 2 * torch.exp(-lv))
        kl = _mean_flat(kl) / math.log(2.0)
        # t = 0: L_0 = -log p(x_0 | x_1), the discretised decoder (DDPM Eq. 13; kept for latents, as the reference)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x_start, m, 0.5 * lv)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        # L_hybrid = L_simple + λ·L_vlb (IDDPM Eq. 16, λ = 0.001) where L_vlb = L_0 + ... + L_{T-1} is the SUM of
        # the T per-step terms. With t ~ Uniform{0..T-1}, E_t[vb_t] = L_vlb / T, so λ·T·vb_t is the per-sample
        # estimate of λ·L_vlb. T is the ORIGINAL number of steps (1000): then λ·T = 0.001·1000 = 1.0 exactly (also
        # in float64), which reproduces the reference's plain `mse + vb` bit for bit on any process, full or
        # respaced (the reference does not rescale vb for respacing either). vb stays in bits/dim like mse.
        loss = mse + (vlb_weight * self.original_num_steps) * vb
        return dict(loss=loss, mse=mse, vb=vb)

    # -------------------------------------------------------------------------
    # sampling. clip_denoised defaults to False (the reference library defaults to True): DiT always passes
    # False because latents are not in [-1, 1]; a pixel-space model should pass clip_denoised=True.
    # CFG is not done here: pass the guided forward (DiT's forward_with_cfg) as `model`. `device` is only
    # where the start noise is drawn when `noise` is None. Every sampler calls the model once per kept step
    # (with CFG, the two halves are one batched call): DDPM "250" = DDIM "250" = DPM-Solver++ "250" = 250 calls.

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None, progress=False):
        """Ancestral sampling (DDPM Alg. 2) over the respaced steps; model(x, t, **model_kwargs) -> (N, 2C, ...)."""
        return self._sample_loop(model, shape, noise, clip_denoised, model_kwargs, device, progress, eta=None)

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling (Song et al. Eq. 12) over the respaced steps; eta = 0 is deterministic; learned Σ unused."""
        return self._sample_loop(model, shape, noise, clip_denoised, model_kwargs, device, progress, eta=eta)

    def _sample_loop(self, model, shape, noise, clip_denoised, model_kwargs, device, progress, eta):
        # RNG order as the reference, so a seed gives the same samples: the start noise, then at every step
        # the model call FIRST and one randn_like(x) after it (also at t = 0, and also for DDIM with eta = 0)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in (tqdm(steps) if progress else steps):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)  # respaced index
            out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            z = torch.randn_like(x)
            nonzero = float(i != 0)  # no noise is added at the last step
            if eta is None:
                # DDPM: x_{t-1} = μ_θ + Σ^(1/2)·z
                x = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * z
            else:
                # DDIM: ε re-derived from the (possibly clipped) x_0, then Song et al. Eq. 12 with σ from Eq. 16
                x0 = out["pred_xstart"]
                eps = (self._at("sqrt_recip_alphas_cumprod", t, x) * x - x0) / self._at("sqrt_recipm1_alphas_cumprod", t, x)
                ab, ab_prev = self._at("alphas_cumprod", t, x), self._at("alphas_cumprod_prev", t, x)
                sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
                x = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps + nonzero * sigma * z
        return x

    def check_dpm_solver_steps(self):
        """DPM-Solver++ takes evenly spaced steps only (see below); callers can check before they load a model."""
        gaps = self.timestep_map.diff()
        if gaps.max() - gaps.min() > 1:
            raise ValueError(f"DPM-Solver++ needs evenly spaced steps, but this respacing keeps {self.num_timesteps} steps with gaps "
                             f"from {gaps.min().item()} to {gaps.max().item()}: pass a plain step count like '{self.num_timesteps}' instead")

    @torch.no_grad()
    def dpm_solver_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None, progress=False):
        """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) over the respaced steps, one model call per step; learned Σ unused."""
        return self._dpm_solver_loop(model, shape, noise, clip_denoised, model_kwargs, device, progress, sde=False)

    @torch.no_grad()
    def sde_dpm_solver_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None, device=None, progress=False):
        """SDE-DPM-Solver++(2M): the same steps for the reverse SDE, fresh noise at each; learned Σ unused."""
        return self._dpm_solver_loop(model, shape, noise, clip_denoised, model_kwargs, device, progress, sde=True)

    def _dpm_solver_loop(self, model, shape, noise, clip_denoised, model_kwargs, device, progress, sde):
        # 2M extrapolates x_θ by (x_θ - x_θ_prev)·h/(2·h_prev), so it wants even steps: a plain count or 'ddimN'. Section counts keep
        # two adjacent steps at each section boundary ("10,15,20": 333 and 334), where that factor is ~18 and amplifies network noise.
        self.check_dpm_solver_steps()
        # x_t = α_t·x_0 + σ_t·ε with α_t = √ᾱ_t, σ_t = √(1-ᾱ_t) and the half log-SNR λ_t = log(α_t/σ_t), float64, at the kept steps
        alpha, sigma = np.sqrt(self.alphas_cumprod), np.sqrt(1.0 - self.alphas_cumprod)
        lam = np.log(alpha / sigma)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in (tqdm(steps) if progress else steps):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)  # respaced index
            eps, _ = self._model(model, x, t, model_kwargs)
            z = torch.randn_like(x) if sde else None  # in DDPM's RNG order: after the model call, also at the last step
            x0 = (x - sigma[i] * eps) / alpha[i]  # the data prediction x_θ = (x_t - σ_t·ε_θ)/α_t that ++ integrates
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            if i == 0:  # the last call (at original step 0, σ ≈ 0.01) gives x_θ, returned below, as DDPM and DDIM do
                continue  # (not break, after which a progress bar would not count this step)
            # Alg. 2, from kept step i to i-1: D = (1 + 1/(2r))·x_θ - 1/(2r)·x_θ_prev with h = λ_{i-1} - λ_i, r = h_prev/h.
            # D = x_θ (first order) on the first step, which has no x_θ_prev, and on the step onto step 0, which crosses a fifth
            # to a half of the λ range (h ≈ 4·h_prev): extrapolating over it made the error 2-5x larger on closed-form problems
            # (diffusers: euler_at_final on a grid ending at step 0)
            h = lam[i - 1] - lam[i]
            D = x0 if i == self.num_timesteps - 1 or i == 1 else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
            if sde:
                # the reverse SDE's linear part and its noise integrated exactly over [λ_i, λ_{i-1}], x_θ taken as D:
                # x ← (σ_{i-1}/σ_i)·e^{-h}·x + α_{i-1}·(1 - e^{-2h})·D + σ_{i-1}·√(1 - e^{-2h})·z. With D = x_θ this is DDPM's
                # posterior step q(x_{i-1} | x_i, x_θ) with variance β̃ (the lower end of the learned range)
                x = (sigma[i - 1] / sigma[i] * np.exp(-h)) * x - (alpha[i - 1] * np.expm1(-2 * h)) * D \
                    + (sigma[i - 1] * np.sqrt(-np.expm1(-2 * h))) * z
            else:  # the probability-flow ODE (Alg. 2): x ← (σ_{i-1}/σ_i)·x - α_{i-1}·(e^{-h} - 1)·D; first order = DDIM
                x = (sigma[i - 1] / sigma[i]) * x - (alpha[i - 1] * np.expm1(-h)) * D
            x0_prev, h_prev = x0, h
        return x0

# -----------------------------------------------------------------------------

def create_diffusion(timestep_respacing):
    """DiT's diffusion: linear betas, ε-prediction, learned-range Σ; timestep_respacing "" for training, "250" to sample."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # DDPM's linear schedule for T = 1000 (Ho et al. §4)
    return GaussianDiffusion(betas, space_timesteps(1000, timestep_respacing))
