"""
DiT, the diffusion transformer (Peebles & Xie 2022, arXiv:2212.09748), written from scratch with the
parameter names of the published checkpoints, so DiT-XL-2-256x256.pt and -512x512.pt load with strict=True.
Each block has empty slots for the scale factors γ of DiffFit (Xie et al. 2023, arXiv:2304.06648); they
stay None (no parameters, no state-dict keys) until difffit.py fills them in.
"""
import inspect
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import files
from files import atomic_write, load_file, pretrained_file, published, read_safetensors, write_safetensors

# -----------------------------------------------------------------------------
# helpers

def modulate(x, shift, scale):
    """adaLN: per-sample shift and scale (N, D) of every token of x (N, T, D): x·(1 + scale) + shift, one fused kernel."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))

def timestep_embedding(t, dim=256, max_period=10000):
    """(N,) steps, possibly fractional -> (N, dim) sinusoidal features, cos first (GLIDE convention)."""
    half = dim // 2  # dim is even (256 in DiT)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (N, dim)

# -----------------------------------------------------------------------------
# the pieces of a DiT

class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each to D: a strided conv."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D), tokens row-major over the patch grid

class TimestepEmbedder(nn.Module):
    """Diffusion step t -> D-dim vector: sinusoidal features then a 2-layer MLP."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))  # 256 features

    def forward(self, t):
        return self.mlp(timestep_embedding(t))

class LabelEmbedder(nn.Module):
    """Class label -> D-dim vector; in training a label is replaced by the null class num_classes with prob dropout_prob."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        # the extra row is the null class for classifier-free guidance (only there if labels are ever dropped)
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)

def attention(q, k, v):
    """softmax(q k^T / sqrt(hs)) v over (B, nh, T, hs): PyTorch's fused kernel, except when training in bf16 on a CPU
    at up to 576 tokens (DiT at 256 px has 256), where the CPU flash kernel's backward is slower than these three ops
    (README, speed and memory). They keep the (B, nh, T, T) weights for the backward, and their bf16 scores round a
    sharp softmax more than the fused kernel does, but a bf16 step's gradients are as close to fp32's either way: the
    rounding of the linear layers dominates."""
    if q.is_cpu and q.dtype == torch.bfloat16 and q.requires_grad and q.shape[-2] <= 576:
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v  # (B, nh, T, hs)
    return F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs), scale 1/sqrt(hs)

class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection laid out [q; k; v], as in the checkpoints."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_parameter("gamma_qkv", None)  # DiffFit γ on the qkv output, (3D,); None = absent

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, 3C)
        if self.gamma_qkv is not None:  # DiffFit Table 4c: γ also scales the qkv projection
            # qkv + qkv * (γ - 1): stays in bf16 under autocast, and γ - 1 keeps γ's small steps that bf16 γ would round to 1
            qkv = torch.addcmul(qkv, qkv, (self.gamma_qkv - 1).to(qkv.dtype))
        q, k, v = qkv.view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        x = attention(q, k, v)  # (B, nh, T, hs)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

def gelu_tanh(x):
    """GELU with the tanh approximation, as DiT was trained: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
    Compiled, it is written as x sigmoid(2u), the same function, computed in fp32: Inductor's CPU tanh is the slow part
    of a bf16 step (fp32 sigmoid: 18 vs 40 ms forward and backward at S/2's batch-32 shape on an AMX CPU)."""
    if torch.compiler.is_compiling():
        xf = x.float()
        return (xf * torch.sigmoid(xf * (1.5957691216057308 + 0.07135481627260025 * xf * xf))).to(x.dtype)
    return F.gelu(x, approximate="tanh")

class Mlp(nn.Module):
    """Two Linears with a tanh-approximated GELU between them."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))

class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning c, with gated residuals (adaLN-Zero)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.register_parameter("gamma_attn", None)  # DiffFit γ1, (D,); None = absent
        self.register_parameter("gamma_mlp", None)   # DiffFit γ2, (D,); None = absent

    def forward(self, x, c):
        # the six (N, D) modulation vectors, in the checkpoints' order
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # DiffFit Algorithm 1: x = x + γ1·gate·attn(...), x = x + γ2·gate·mlp(...). γ and the gate both scale channels, so
        # their (N, D) product is formed first and each residual update is one fused multiply-add over (N, T, D)
        if self.gamma_attn is not None:
            gate_msa = gate_msa * self.gamma_attn
        if self.gamma_mlp is not None:
            gate_mlp = gate_mlp * self.gamma_mlp
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))

class FinalLayer(nn.Module):
    """Modulated LayerNorm then a Linear to each token's p x p x out_channels patch (no gate)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.register_parameter("gamma", None)  # DiffFit γ on the output, (p·p·out_channels,); None = absent

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # shift first, then scale
        x = self.linear(modulate(self.norm_final(x), shift, scale)).float()  # fp32 under bf16 autocast too: the sampler's input
        if self.gamma is not None:  # DiffFit Table 4c: γ also scales the final layer's output
            x = x * self.gamma
        return x

# -----------------------------------------------------------------------------
# DiT

class DiT(nn.Module):
    """Diffusion transformer: patchify, add position, N adaLN-Zero blocks conditioned on t + y, unpatchify."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels  # [ε, v]: v interpolates the log-variance
        self.num_classes, self.hidden_size, self.depth, self.num_heads = num_classes, hidden_size, depth, num_heads
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # a fixed table, but a Parameter (not a buffer) because that is what the checkpoints hold
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier Linears, fixed sin-cos positions, N(0, 0.02) embeddings, zeroed adaLN (adaLN-Zero)."""
        # every Linear: xavier-uniform weight, zero bias (the adaLN Linears are zeroed again below)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # the fixed 2-D sin-cos position table
        table = get_2d_sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)  # (T, D)
        self.pos_embed.data.copy_(table.unsqueeze(0))
        # the patch conv is initialised like a Linear on the flattened (C·p·p) patch
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # label table and timestep MLP weights: N(0, 0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for i in (0, 2):
            nn.init.normal_(self.t_embedder.mlp[i].weight, std=0.02)
        # adaLN-Zero: all modulations (so all gates) start at 0, so every block starts as the identity, and the output
        # layer starts at 0, so a fresh DiT outputs exactly 0
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):
        """(N, T, p·p·C) tokens -> (N, C, H, W); each token holds its patch as (p_row, p_col, channel)."""
        p, c, h = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y):
        """
        x: (N, C, H, W) latents (or pixels), t: (N,) diffusion steps 0..999, y: (N,) labels (num_classes = null).
        Returns (N, out_channels, H, W): ε in channels [0:C], and with learn_sigma the variance interpolation v in [C:2C].
        """
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):  # a readable line, not a broadcast error inside
            raise ValueError(f"this DiT takes x of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), got {tuple(x.shape)} "
                             f"(latents are image size / 8; build it with input_size=H for other sizes)")
        x = self.x_embedder(x) + self.pos_embed     # (N, T, D), T = (H / p)^2
        c = self.t_embedder(t) + self.y_embedder(y) # (N, D)
        for block in self.blocks:
            x = block(x, c)                         # (N, T, D)
        x = self.final_layer(x, c)                  # (N, T, p·p·out_channels)
        return self.unpatchify(x)                   # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        """
        Classifier-free guidance in one batch. x: (2n, C, H, W) = [cond half; uncond half], y = [labels; null],
        of which only the first half of x is used. Returns (2n, out_channels, H, W); both halves carry the same guided ε.
        """
        # The reference guides only ε channels [0:3] (a GLIDE leftover for RGB, kept by the DiT authors "for exact
        # reproducibility"); the published FIDs (2.27 at cfg 1.5) depend on it, so it is the default here.
        # guide_channels=None guides every ε channel (what diffusers does; 1.5 on 3 channels ≈ 1.375 on 4).
        k = self.in_channels if guide_channels is None else guide_channels
        half = x[: len(x) // 2]                             # (n, C, H, W)
        out = self.forward(torch.cat([half, half]), t, y)   # (2n, out_channels, H, W), fp32 (FinalLayer)
        eps, rest = out.split([k, out.shape[1] - k], dim=1) # (2n, k, H, W), (2n, out_channels - k, H, W)
        cond, uncond = eps.chunk(2)                         # (n, k, H, W) each
        guided = uncond + cfg_scale * (cond - uncond)       # (n, k, H, W)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)  # (2n, out_channels, H, W)

def _misfit(got, ref, a="", b=""):
    """Why the tensors `got` do not fit the layout `ref` (name -> tensor), as one phrase; "" if they fit."""
    missing, unexpected = sorted(ref.keys() - got.keys()), sorted(got.keys() - ref.keys())
    shape = [f"{k} {a}{tuple(got[k].shape)} vs {b}{tuple(ref[k].shape)}" for k in ref if k in got and got[k].shape != ref[k].shape]
    few = lambda ks: ", ".join(ks[:3]) + (f" (+{len(ks) - 3} more)" if len(ks) > 3 else "")
    return "; ".join(f"{what} {few(ks)}" for what, ks in [("missing", missing), ("unexpected", unexpected), ("shape", shape)] if ks)

def load_dit_state_dict(model, state_dict, name):
    """load_state_dict(strict=True), but a mismatch raises one readable line naming the config."""
    if found := _misfit(state_dict, model.state_dict(), "checkpoint ", "model "):
        S, kind = model.input_size, "latents" if model.in_channels == 4 else "pixels"
        raise ValueError(f"checkpoint does not fit {name} at {S}x{S} {kind}: {found} — pick the --model / --image-size the checkpoint was trained with")
    model.load_state_dict(state_dict, strict=True)
    return model

def raw_config(model, image_size):
    """The architecture of a published DiT file, which stores weights only: a preset at image_size / 8 latents, 1000 classes."""
    return dict(model=model, input_size=image_size // 8, in_channels=4, num_classes=1000)

def save_model(path, state_dict, config):
    """A plain DiT as .safetensors, its architecture (config: DiT_models preset and/or DiT kwargs) in the metadata."""
    write_safetensors(path, state_dict, {"format": "dit", "config": json.dumps(config)})

def load_model(path, config=None, input_size=None):
    """(model, config, base_grid): a DiT with its weights loaded strictly. `path` is "scratch" (random init), a file of
    save_model (which carries its config), a published DiT file (downloaded if it is a name in PRETRAINED), a diffusers
    DiT folder or hub name (read_diffusers_dit), a state dict, or an older {"config", "model"} / DiT train.py {"ema"}
    file; files without a config take `config`.
    With input_size, a base trained at another resolution loads too: all but its position table must fit, and
    base_grid says which patch grid it was trained on (for difffit's pos-embed trick)."""
    sd = None
    if path in files.PRETRAINED and not os.path.exists(path):
        path = pretrained_file(path)
    if os.path.isdir(path) or (published(path) and not os.path.exists(path)):  # a diffusers DiT folder, or a hub name
        sd, config = read_diffusers_dit(path)
    elif path != "scratch":
        sd = load_file(path)
        if isinstance(sd, tuple):  # safetensors: (tensors, metadata)
            sd, meta = sd
            if meta.get("format") == "difffit-delta":
                raise ValueError(f"{path}: a DiffFit delta, not a model: pass it as --delta")
            config = json.loads(meta["config"]) if "config" in meta else config
        elif isinstance(sd, dict) and "config" in sd and "model" in sd:  # this repo's older .pt format
            config, sd = sd["config"], sd["model"]
        elif isinstance(sd, dict) and "delta" in sd and "opt" in sd:
            raise ValueError(f"{path}: a training checkpoint of train.py, not a model: pass its run's delta.safetensors as --delta "
                             "(or model.safetensors as --ckpt)")
        elif isinstance(sd, dict) and "ema" in sd:  # a checkpoint of DiT's own train.py: its EMA weights, as DiT samples them
            sd = sd["ema"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path}: not a DiT checkpoint (expected a state dict of tensors)")
        if config is None:
            raise ValueError(f"{path}: a raw state dict carries no architecture: pass --model and --image-size")
    config = dict(config, **({"input_size": input_size} if input_size else {}))
    kwargs = {k: v for k, v in config.items() if k != "model"}
    odd = [k for k in kwargs if k not in inspect.signature(DiT).parameters]
    if "model" in config and config["model"] not in DiT_models:
        odd.append(f"model {config['model']}")
    if odd:  # e.g. the toy judge, which is stored the same way
        raise ValueError(f"{path}: not a DiT checkpoint (its config has {', '.join(odd)}, which no DiT has)")
    model = DiT_models[config["model"]](**kwargs) if "model" in config else DiT(**kwargs)
    base_grid = model.input_size // model.patch_size
    if sd is not None:
        pe = sd.get("pos_embed")
        if input_size and pe is not None and pe.shape[1] != model.pos_embed.shape[1] and pe.shape[2] == model.hidden_size:
            base_grid = math.isqrt(pe.shape[1])  # e.g. the 256 checkpoint (16x16 grid) for a 512 model (32x32)
            sd = {**sd, "pos_embed": model.pos_embed.detach()}  # keep this model's own table
        load_dit_state_dict(model, sd, config.get("model", "DiT") + f" {kwargs}")
    return model, config, base_grid

# -----------------------------------------------------------------------------
# 2-D sin-cos position embedding (from MAE), computed in float64 like the reference, then cast to float32

def get_2d_sincos_pos_embed(embed_dim, grid_size, scale=1.0):
    """
    (G·G, D) float32 table; token r·G + c gets [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)], ω_k = 10000^(-4k/D).
    The coordinates are arange(G) / scale: scale=2 is DiffFit's positional-encoding trick (§4.3), which
    evaluates a 2G grid at (i/2, j/2) so that its even positions repeat the G table the model was trained on.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64) / scale            # (G,)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")                # (G, G) each, row-major tokens
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))  # (D/4,)
    def sincos(pos):  # (G, G) -> (G·G, D/2)
        a = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)
    # column (x) coordinate in the first half: the reference's "emb_h" is really the column (meshgrid(w, h))
    return torch.cat([sincos(cols), sincos(rows)], dim=1).float()

# -----------------------------------------------------------------------------
# size presets (DiT paper Table 1); XL/2 is the one with published weights

def DiT_XL_2(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def DiT_XL_4(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def DiT_XL_8(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)
def DiT_L_2(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def DiT_L_4(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def DiT_L_8(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)
def DiT_B_2(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def DiT_B_4(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def DiT_B_8(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)
def DiT_S_2(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def DiT_S_4(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
def DiT_S_8(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)

DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}

def native_bf16(device):
    """A CUDA GPU from Ampere on, or a CPU with AVX512-BF16 or AMX. Older GPUs and AVX2-only CPUs emulate bf16, far slower
    than fp32 (a 2048² matmul on a Zen 3: 0.0003 TFLOP/s against 0.14), so "auto" leaves them in fp32."""
    if device.type == "cuda":  # compute capability 8.0 on (ROCm GPUs all have it); is_bf16_supported() counts emulation
        return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()

def bf16_chosen(precision, device):
    """--precision in every script: bf16 autocast for "bf16", and for "auto" where the hardware runs bf16 natively."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))

def precision_note(precision, device):
    """What --precision chose, as every script prints it; a warning where bf16 is asked of hardware that emulates it."""
    bf16 = bf16_chosen(precision, device)
    note = f"--precision {precision}: {'bf16 autocast' if bf16 else 'fp32'} on {device}"
    if not native_bf16(device):
        note += " (warning: no native bf16 here, it is emulated, far slower; use --precision fp32)" if bf16 else " (no native bf16 here)"
    return note

# -----------------------------------------------------------------------------
# the VAE of Stable Diffusion, which DiT works in (stabilityai/sd-vae-ft-ema and -mse; arXiv:2112.10752)

VAE_SCALE = 0.18215  # SD VAE latent scale: DiT trains on posterior samples * VAE_SCALE, decodes z / VAE_SCALE

class ResnetBlock(nn.Module):
    """Pre-norm residual block: (GroupNorm, SiLU, 3x3 conv) twice, 1x1 conv shortcut if channels change."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # in-place is safe: GroupNorm keeps its input, not output
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        # add the shortcut into the fresh conv output instead of allocating a third full-size tensor
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))

class VAEAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with its own GroupNorm and a residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # a list only so the key reads to_out.0 (diffusers had a dropout at 1)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C), already contiguous for channels-last x
        q, k, v = (lin(h).unsqueeze(1) for lin in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (N, 1, HW, C)
        h = self.to_out[0](h.squeeze(1))  # (N, HW, C)
        return x + h.transpose(1, 2).reshape(N, C, H, W)  # x first: the sum keeps x's memory format

class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: resnet, attention, resnet."""

    def __init__(self, c, groups):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(c, groups)])  # registered first, as in diffusers' key order
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))

class Resample(nn.Module):
    """2x down: stride-2 3x3 conv after padding right and bottom by one (LDM's convention); 2x up: nearest, 3x3 conv."""

    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0) if down else nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))

class Level(nn.Module):
    """One resolution level: n resnets, then an optional 2x Resample (key downsamplers.0 or upsamplers.0)."""

    def __init__(self, cin, cout, n, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if down: self.downsamplers = nn.ModuleList([Resample(cout, down=True)])
        if up: self.upsamplers = nn.ModuleList([Resample(cout, down=False)])

    def forward(self, x):
        for layers in self.children():  # resnets, then downsamplers or upsamplers if this level has them
            for layer in layers:
                x = layer(x)
        return x

class Encoder(nn.Module):
    """Image (N, cin, H, W) -> posterior moments (N, 2 * latent, H / 2^(L-1), W / 2^(L-1)) for L levels."""

    def __init__(self, cin, ch, n, groups, latent):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], n, groups, down=i < len(ch) - 1)
                                          for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * latent, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))

class Decoder(nn.Module):
    """Latent (N, latent, h, w) -> image (N, cout, h * 2^(L-1), w * 2^(L-1)); one more resnet per level than the encoder."""

    def __init__(self, cout, ch, n, groups, latent):
        super().__init__()
        rch = ch[::-1]  # widest level first
        self.conv_in = nn.Conv2d(latent, rch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([Level(rch[max(i - 1, 0)], rch[i], n + 1, groups, up=i < len(ch) - 1)
                                        for i in range(len(ch))])
        self.mid_block = MidBlock(rch[0], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], cout, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))

# encode/decode return fp32 whatever autocast runs the convs in (bf16 on GPUs and bf16-capable CPUs).
class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder; the defaults are the sd-vae-ft-{ema,mse} config (83.7M parameters)."""

    def __init__(self, in_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 norm_num_groups=32, latent_channels=4):
        super().__init__()
        ch, n, g, lat = list(block_out_channels), layers_per_block, norm_num_groups, latent_channels
        self.encoder = Encoder(in_channels, ch, n, g, lat)
        self.decoder = Decoder(in_channels, ch, n, g, lat)  # images come out with as many channels as went in
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1)
        self.post_quant_conv = nn.Conv2d(lat, lat, 1)

    def encode(self, x):
        """x (N, 3, H, W) in [-1, 1] -> UNSCALED posterior (mean, std), each (N, 4, H/8, W/8), in fp32."""
        mean, logvar = self.quant_conv(self.encoder(x)).float().chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # same clamp as diffusers/LDM

    def decode(self, z):
        """UNSCALED latent z (N, 4, h, w) -> image (N, 3, 8h, 8w) in about [-1, 1], in fp32 (so pass z / VAE_SCALE)."""
        return self.decoder(self.post_quant_conv(z)).float()

# attention names of diffusers < 0.14 (files such as sd-vae-ft-*'s .bin still use them) -> current names
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

def load_vae(path, **config):
    """AutoencoderKL(**config) with a diffusers VAE file loaded strictly: "ema" or "mse" (the published
    sd-vae-ft-* weights, downloaded once into pretrained/), or a local .safetensors / .bin / folder."""
    if path in ("ema", "mse"):
        path = pretrained_file(f"sd-vae-ft-{path}.safetensors")
    if os.path.isdir(path):
        st = os.path.join(path, "diffusion_pytorch_model.safetensors")
        path = st if os.path.exists(st) else os.path.join(path, "diffusion_pytorch_model.bin")
    sd = load_file(path, "VAE")
    sd = sd[0] if isinstance(sd, tuple) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"VAE {path}: expected a dict of tensors, got {type(sd).__name__}")
    # rename old attention keys and flatten attention weights stored as 1x1 convs (out, in, 1, 1) -> (out, in)
    fixed = {}
    for k, v in sd.items():
        if ".attentions." in k:
            *head, name, leaf = k.split(".")
            k = ".".join(head + [_OLD_ATTN.get(name, name), leaf])
            if leaf == "weight" and v.ndim > 2 and all(s == 1 for s in v.shape[2:]):
                v = v.flatten(1)
        fixed[k] = v
    with torch.device("meta"):  # shapes only: skip the random init and a second copy of the weights
        model = AutoencoderKL(**config)
    if misfit := _misfit(fixed, model.state_dict()):
        raise ValueError(f"{path}: not an AutoencoderKL{config or ''} state dict: {misfit}")
    model.load_state_dict({k: v.float() for k, v in fixed.items()}, strict=True, assign=True)  # fp32 params
    return model.eval()

# -----------------------------------------------------------------------------
# diffusers' DiTTransformer2DModel folders: in (the transformer/ of facebook/DiT-XL-2-256 and -512, or what
# save_pretrained wrote) and out (for DiTPipeline). Layout facts from diffusers 0.42 (dit_transformer_2d.py,
# attention.py BasicTransformerBlock, normalization.py AdaLayerNormZero, embeddings.py):
# - every tensor keeps its layout; the block's 6-way modulation (norm1.linear) chunks in our order (shift, scale, gate
#   of attention, then of the MLP) and proj_out_1 in final_layer's (shift, scale). Only qkv is split into to_q/k/v.
# - each block stores its own copy of the timestep and class embedders (the final layer uses block 0's), and the
#   class table always has a null row (dropout 0.1 is hard-coded). pos_embed is not stored: diffusers recomputes it.
# - two numerical differences: diffusers' timestep features use downscale_freq_shift=1, frequencies 10000^(-k/127)
#   instead of DiT's 10000^(-k/128) (no weight can undo that), and its MLP LayerNorm eps is config.norm_eps (default
#   1e-5; DiT: 1e-6). Import reads the weights as DiT's (the hub files are converted DiT checkpoints); export writes
#   norm_eps 1e-6, but stock diffusers still computes the other timestep features (tests/test_diffusers.py measures it).
_DIFFUSERS = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1", "final_layer.linear": "proj_out_2",
              # inside a block: blocks.{i}.<ours> -> transformer_blocks.{i}.<theirs>
              "adaLN_modulation.1": "norm1.linear", "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
              "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
_EMBEDDERS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1", "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
              "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}  # one copy in every block there
# DiTTransformer2DModel's defaults (the XL/2-256 config), so a config.json that leaves a key out means what it means there
_DIT_CONFIG = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28, sample_size=32,
                   patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
                   attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-5)

def _diffusers_names(key, depth):
    """Our key -> the diffusers keys holding it: one (renamed), three (to_q, to_k, to_v) or depth (embedder copies)."""
    name, leaf = key.rsplit(".", 1)
    if name in _EMBEDDERS:
        return [f"transformer_blocks.{i}.{_EMBEDDERS[name]}.{leaf}" for i in range(depth)]
    if not name.startswith("blocks."):
        return [f"{_DIFFUSERS[name]}.{leaf}"]
    _, i, name = name.split(".", 2)
    theirs = _DIFFUSERS[name]
    return [f"transformer_blocks.{i}.{n}.{leaf}" for n in (theirs if isinstance(theirs, tuple) else (theirs,))]

def _to_diffusers(sd, depth):
    """Our state dict -> diffusers' key layout (without pos_embed)."""
    out = {}
    for k, v in sd.items():
        if k != "pos_embed":
            names = _diffusers_names(k, depth)
            out.update(zip(names, v.chunk(3) if ".qkv." in k else [v] * len(names)))  # [q; k; v] rows -> three Linears
    return out

def _from_diffusers(dsd, model):
    """diffusers' tensors -> the state dict of `model` (block 0's embedder copies; the standard pos_embed table)."""
    sd = {"pos_embed": get_2d_sincos_pos_embed(model.hidden_size, model.input_size // model.patch_size).unsqueeze(0)}
    for k in model.state_dict():
        if k != "pos_embed":
            names = _diffusers_names(k, model.depth)
            sd[k] = torch.cat([dsd[n] for n in names]) if ".qkv." in k else dsd[names[0]]
    return sd

def read_diffusers_dit(folder):
    """A diffusers DiT folder (config.json + diffusion_pytorch_model.safetensors or .bin), or a hub name in PRETRAINED such as
    "facebook/DiT-XL-2-256" (downloaded once) -> (state dict in our layout, kwargs for DiT(**kwargs)).
    A folder that is not a DiT, or weights that do not fit its config, raise ValueError naming the folder."""
    if not os.path.isdir(folder) and f"{folder}/transformer/config.json" in files.PRETRAINED:
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            path = pretrained_file(f"{folder}/transformer/{name}")
        folder = os.path.dirname(path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder}: a folder, but not a diffusers DiT folder (no config.json in it): pass a checkpoint file or such a folder")
    with open(os.path.join(folder, "config.json")) as f:
        c = {**_DIT_CONFIG, **json.load(f)}
    # the hub's DiT folders still say Transformer2DModel, which diffusers maps to DiTTransformer2DModel by norm_type
    if (name := c.get("_class_name")) not in ("DiTTransformer2DModel", "Transformer2DModel") or c["norm_type"] != "ada_norm_zero":
        norm = f" with norm_type {c['norm_type']}" if name in ("DiTTransformer2DModel", "Transformer2DModel") else ""
        raise ValueError(f"{folder}: not a diffusers DiT: its config.json describes a {name}{norm} "
                         "(a DiT is a DiTTransformer2DModel, or a Transformer2DModel with norm_type ada_norm_zero)")
    cin, cout, heads = c["in_channels"], c["out_channels"] or c["in_channels"], c["num_attention_heads"]
    if cout not in (cin, 2 * cin) or c["activation_fn"] != "gelu-approximate" or not c["attention_bias"]:
        raise ValueError(f"{folder}: not a DiT that models.DiT can hold: {cin} -> {cout} channels, activation {c['activation_fn']}, "
                         f"attention_bias {c['attention_bias']}")
    kwargs = dict(input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=cin, hidden_size=heads * c["attention_head_dim"],
                  depth=c["num_layers"], num_heads=heads, num_classes=c["num_embeds_ada_norm"], learn_sigma=cout == 2 * cin)
    st, pt = (os.path.join(folder, "diffusion_pytorch_model" + ext) for ext in (".safetensors", ".bin"))
    if os.path.exists(st):
        dsd, _ = read_safetensors(st)  # a truncated or inconsistent file raises here, naming it
    elif os.path.exists(pt):
        dsd = load_file(pt, "diffusers DiT weights")
    else:
        raise FileNotFoundError(f"{folder}: neither diffusion_pytorch_model.safetensors nor .bin is there")
    try:
        with torch.device("meta"):  # shapes only
            model = DiT(**kwargs)
    except ValueError as e:
        raise ValueError(f"{folder}: config.json gives no valid DiT: {e}") from None
    misfit = _misfit(dsd, _to_diffusers(model.state_dict(), model.depth)) if isinstance(dsd, dict) else f"a {type(dsd).__name__}"
    if misfit:
        raise ValueError(f"{folder}: the weights do not fit its config.json (DiT {kwargs}): {misfit}")
    for k in model.state_dict():  # the per-block embedder copies are one DiT embedder only if they are all equal
        names = _diffusers_names(k, model.depth) if k.rsplit(".", 1)[0] in _EMBEDDERS else []
        if bad := [n for n in names[1:] if not torch.equal(dsd[n], dsd[names[0]])]:
            raise ValueError(f"{folder}: the per-block copies of {names[0].split('.', 2)[2]} differ ({bad[0]} is not block 0's), "
                             "so they are not one DiT embedder")
    sd = _from_diffusers(dsd, model)
    K = c.get("_difffit_num_classes", kwargs["num_classes"])  # written by write_diffusers_dit: undo its padding
    table, N = sd["y_embedder.embedding_table.weight"], kwargs["num_classes"]
    if K != N:
        sd["y_embedder.embedding_table.weight"], kwargs["num_classes"] = torch.cat([table[:K], table[N:]]), K
    return sd, dict(kwargs, class_dropout_prob=0.1)

def write_diffusers_dit(state_dict, config, folder):
    """A plain DiT state dict (DiffFit's γ merged in: difffit.merge) and its config ({"model": preset, **kwargs} or DiT
    kwargs) -> folder/config.json + diffusion_pytorch_model.safetensors for DiTTransformer2DModel.from_pretrained and
    DiTPipeline. DiTPipeline guides all 4 latent channels (DiT: 3), drops the learned variance (its schedulers use a
    fixed one) and hard-codes the null class 1000 (diffusers issue #13616), so a K < 1000-class table is written with
    1001 rows: the K classes, then copies of the null row at K..1000. Labels 0..K-1 then sample the classes, 1000 is the
    null class CFG needs, and an unused id K..999 samples the unconditional model (copies, not zeros: zero rows would be
    a conditioning the model never saw). K > 1000 is written as is (null row K): the transformer is right, but
    DiTPipeline's CFG would guide against class 1000; use guidance_scale=1 there."""
    kwargs = {k: v for k, v in config.items() if k != "model"}
    with torch.device("meta"):  # shapes only
        model = DiT_models[config["model"]](**kwargs) if "model" in config else DiT(**kwargs)
    if misfit := _misfit(state_dict, model.state_dict()):
        hint = " (merge DiffFit's γ first: difffit.merge)" if any("gamma" in k for k in state_dict) else ""
        raise ValueError(f"cannot export to {folder}: the state dict does not fit {config}: {misfit}{hint}")
    D, K, G = model.hidden_size, model.num_classes, model.input_size // model.patch_size
    if model.blocks[0].mlp.fc1.out_features != 4 * D or model.y_embedder.embedding_table.num_embeddings != K + 1:
        raise ValueError(f"cannot export to {folder}: diffusers' DiT has mlp_ratio 4 and a null class row (class_dropout_prob > 0)")
    if (state_dict["pos_embed"].detach().float().cpu() - get_2d_sincos_pos_embed(D, G)).abs().max() > 1e-2:
        raise ValueError(f"cannot export to {folder}: pos_embed is not the standard {G}x{G} sin-cos table (DiffFit's 512 px "
                         "trick?), and diffusers always recomputes the standard one")
    N, table = max(K, 1000), state_dict["y_embedder.embedding_table.weight"]
    sd = dict(state_dict, **{"y_embedder.embedding_table.weight": torch.cat([table[:K], table[K:].expand(N + 1 - K, D)])})
    cfg = dict(_DIT_CONFIG, _class_name="DiTTransformer2DModel", num_attention_heads=model.num_heads, attention_head_dim=D // model.num_heads,
               in_channels=model.in_channels, out_channels=model.out_channels, num_layers=model.depth, sample_size=model.input_size,
               patch_size=model.patch_size, num_embeds_ada_norm=N, norm_eps=1e-6, _difffit_num_classes=K)  # diffusers skips "_" keys
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), _to_diffusers(sd, model.depth), {"format": "pt"})
    atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(json.dumps(cfg, indent=2).encode()))
