"""
DiffFit and the methods it is compared with: which parameters of a pretrained DiT train, and what follows from that.

DiffFit (Xie et al. 2023, arXiv:2304.06648) freezes a pretrained DiT and trains only its biases, its class
embedding and new scale factors γ (initialised to 1) on some blocks. This file does that model surgery after
the base weights are loaded, and the surgery of the paper's Table 1 baselines (BitFit, LoRA, AdaptFormer,
VPT-deep); counts parameters the way the paper's tables do; owns the delta format (the few-MB file a run
produces: the trained tensors and what rebuilds the model from its base); folds γ and LoRA back into plain DiT
weights; and interpolates the position table for 256 -> 512 transfer.

    python difffit.py --model DiT-XL/2 --num-classes 101   # Table 1's parameter column (meta device, no memory)
    python difffit.py --export results/000-food101-difffit/delta.safetensors --out food101-dit   # a diffusers DiT folder
"""
import argparse
import hashlib
import json
import math
import os
import sys
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import check_flags, load_file, published, unwritable, write_safetensors
from models import DiT_models, gelu_tanh, get_2d_sincos_pos_embed, load_model, write_diffusers_dit

# -----------------------------------------------------------------------------
# modules the comparison methods add (Table 1). Each takes over the frozen tensors of the module it replaces
# under their original names, and starts as the identity update, so the surgery leaves the function unchanged.

class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable rank-r update B·A (LoRA, Hu et al. 2021, arXiv:2106.09685); B starts at 0."""

    def __init__(self, linear, rank):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # same tensors, same state-dict keys (attn.qkv.weight)
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's init, as LoRA's code does for A
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, **kw))
        # LoRA scales B·A by alpha / r; we take alpha = r (scale 1): with Adam, a constant scale only moves the lr

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b)

class AdaptedMlp(nn.Module):
    """DiT's MLP with an AdaptFormer bottleneck (Chen et al. 2022, arXiv:2205.13535) beside it or after it."""

    def __init__(self, mlp, bottleneck, sequential):
        super().__init__()
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2  # the frozen MLP, same keys (mlp.fc1.weight, ...)
        dim, kw = mlp.fc1.in_features, dict(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        self.adapter_down = nn.Linear(dim, bottleneck, **kw)
        self.adapter_up = nn.Linear(bottleneck, dim, **kw)
        nn.init.zeros_(self.adapter_up.weight)  # AdaptFormer zero-initialises the up-projection
        nn.init.zeros_(self.adapter_up.bias)
        self.sequential = sequential

    def forward(self, x):
        h = self.fc2(gelu_tanh(self.fc1(x)))  # DiT's MLP, unchanged
        a = self.adapter_up(F.relu(self.adapter_down(h if self.sequential else x)))
        return h + 0.1 * a  # s = 0.1, AdaptFormer's scale

class PromptedBlock(nn.Module):
    """VPT-deep (Jia et al. 2022, arXiv:2203.12119): learned tokens join this block's input and leave its output."""

    def __init__(self, block, prompt):
        super().__init__()
        self.block, self.prompt = block, nn.Parameter(prompt)  # (P, D)

    def forward(self, x, c):
        p = self.prompt.expand(len(x), -1, -1)                 # (N, P, D)
        return self.block(torch.cat([x, p], 1), c)[:, :x.shape[1]]  # (N, T, D): the prompts' outputs are dropped

# -----------------------------------------------------------------------------
# which parameters train: one function per method, which adds its parameters (if any) and selects those that train;
# apply() then unfreezes the class table when the dataset's classes are new. A new method is one more function and
# its entry in METHODS, where train.py's --method, bench.py and study.py find it (tests/test_difffit.py lists them all).

def _train_only(model, keep):
    for name, p in model.named_parameters():
        p.requires_grad = keep(name)

def _gamma(n, like):
    """A DiffFit scale factor: starts at 1, so the surgery leaves the model's function unchanged."""
    return nn.Parameter(torch.ones(n, device=like.device, dtype=like.dtype))

def full(model, spec):
    """Full fine-tuning: every parameter trains, except the fixed sin-cos pos_embed."""
    _train_only(model, lambda name: name != "pos_embed")

def bitfit(model, spec):
    """BitFit (Zaken et al. 2021): the biases (Algorithm 2 without γ)."""
    # Algorithm 2 also unfreezes normalisation parameters; DiT's LayerNorms have no affine parameters,
    # so there is nothing to unfreeze there.
    _train_only(model, lambda name: name.endswith(".bias"))

def difffit(model, spec):
    """DiffFit (Algorithm 1 + 2): BitFit plus γ on the chosen blocks, their qkv, and the final layer."""
    for i in spec["gamma_blocks"]:  # Table 4b: the first half of the blocks is best (1->14 of 28)
        block = model.blocks[i]
        block.gamma_attn = _gamma(model.hidden_size, block.attn.proj.weight)  # x + γ1·gate·attn(...)
        block.gamma_mlp = _gamma(model.hidden_size, block.mlp.fc2.weight)     # x + γ2·gate·mlp(...)
        if spec["gamma_qkv"]:  # Table 4c row 5: γ on the qkv projection output
            block.attn.gamma_qkv = _gamma(3 * model.hidden_size, block.attn.qkv.weight)
    if spec["gamma_final"]:  # Table 4c row 6: γ on the final layer's output
        model.final_layer.gamma = _gamma(model.final_layer.linear.out_features, model.final_layer.linear.weight)
    _train_only(model, lambda name: name.endswith(".bias") or "gamma" in name)

def lora(model, spec, rank):
    """LoRA on every block's fused qkv projection, nothing else (Table 1: ranks 8 and 16, 1.15M and 2.18M). One B·A spans
    q, k and v; §2.3's LoRA adapts the query and value with a pair each, the same parameter count (README)."""
    for block in model.blocks:
        block.attn.qkv = LoRALinear(block.attn.qkv, rank)
    _train_only(model, lambda name: ".lora_" in name)

def adapter(model, spec, sequential):
    """AdaptFormer on every block's MLP, parallel or sequential (Table 1: 4.28M, which is bottleneck 64 with biases)."""
    for block in model.blocks:
        block.mlp = AdaptedMlp(block.mlp, 64, sequential)
    _train_only(model, lambda name: ".adapter_" in name)

def vpt_deep(model, spec):
    """VPT-deep with the paper's stable setting (§4.1): 1 token in each of the first 5 blocks, final layer unfrozen."""
    # VPT's uniform init with the patch embedding's fan-in. VPT is the one method that cannot start as the base:
    # any token that joins a softmax changes every query's attention average.
    bound = math.sqrt(6 / (model.in_channels * model.patch_size**2 + model.hidden_size))
    for i in range(min(5, model.depth)):
        prompt = torch.empty_like(model.pos_embed[0, :1]).uniform_(-bound, bound)  # (1 token, D)
        model.blocks[i] = PromptedBlock(model.blocks[i], prompt)
    _train_only(model, lambda name: name.endswith(".prompt") or name.startswith("final_layer."))

METHODS = {"full": full, "bitfit": bitfit, "difffit": difffit,
           "lora-r8": partial(lora, rank=8), "lora-r16": partial(lora, rank=16),
           "adapt-parallel": partial(adapter, sequential=False), "adapt-sequential": partial(adapter, sequential=True),
           "vpt-deep": vpt_deep}

# -----------------------------------------------------------------------------
# the surgery, done once after the base weights are loaded

def make_spec(model, method="difffit", num_classes=None, gamma_blocks=None, gamma_qkv=True, gamma_final=True,
              new_labels=True, base_grid=None):
    """Everything needed to redo the surgery on the same base: stored in every delta."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    gamma_blocks = list(range(model.depth // 2)) if gamma_blocks is None else sorted(set(gamma_blocks))
    if gamma_blocks and not 0 <= gamma_blocks[0] <= gamma_blocks[-1] < model.depth:
        raise ValueError(f"gamma blocks {gamma_blocks} out of range for a DiT of depth {model.depth}")
    # new_labels: the dataset's classes are not the base's (anything but ImageNet -> ImageNet at 512)
    # base_grid: the patch grid the base was trained on, if smaller than this model's (the §4.3 trick)
    return dict(method=method, num_classes=num_classes or model.num_classes, new_labels=new_labels,
                gamma_blocks=gamma_blocks, gamma_qkv=gamma_qkv, gamma_final=gamma_final, base_grid=base_grid,
                fingerprint=fingerprint(model))

def check_method(spec):
    """A delta's method must be one this file has."""
    if spec["method"] not in METHODS:  # a delta of a fork's own method
        raise ValueError(f"the method {spec['method']!r} is not one this difffit.py has ({', '.join(METHODS)}): use the code that trained it")

def apply(model, spec):
    """Freeze the base, resize the class table to the new dataset, interpolate the position table for a larger grid (§4.3),
    add the method's parameters; returns the names of the parameters that train."""
    check_method(spec)
    if spec.get("base_grid") and spec["base_grid"] != model.input_size // model.patch_size:
        interpolate_pos_embed(model, spec["base_grid"])
    if spec["new_labels"]:
        new_label_table(model, spec["num_classes"])
    METHODS[spec["method"]](model, spec)
    if spec["new_labels"]:  # a new dataset's classes must be learned; ImageNet -> ImageNet-512 keeps them (§4.3)
        model.y_embedder.embedding_table.weight.requires_grad = True
    return [name for name, p in model.named_parameters() if p.requires_grad]

def new_label_table(model, num_classes):
    """A K-class dataset needs K + 1 rows; the pretrained null row stays the null row."""
    table = model.y_embedder.embedding_table
    if table.num_embeddings != model.num_classes + 1:
        raise ValueError("resizing the class table needs a model with a null class (class_dropout_prob > 0)")
    null = table.weight.data[-1]
    # Every new class starts as the pretrained *unconditional* embedding, so at step 0 the fine-tuned model
    # is exactly the pretrained unconditional model for every class, a sample the base model knows how to
    # draw; training then pulls the classes apart. (A fresh N(0, 0.02) row would be off-distribution.)
    new = nn.Embedding(num_classes + 1, table.embedding_dim, device=null.device, dtype=null.dtype)
    new.weight.data.copy_(null.expand(num_classes + 1, -1))
    model.y_embedder.embedding_table = new
    model.y_embedder.num_classes = model.num_classes = num_classes

@torch.no_grad()
def fingerprint(model):
    """A short hash of the base weights, so a delta is never applied to a different base."""
    if next(model.parameters()).is_meta:
        return None
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().float().flatten()
        # Hashing all 675M XL/2 weights takes seconds; a strided sample of every tensor (including its
        # first and last values) separates any two checkpoints one would plausibly mix up.
        idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 4096), device=flat.device).long()
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(flat[idx].cpu().numpy().tobytes())
    return h.hexdigest()[:16]

@torch.no_grad()
def store_frozen(model, dtype):
    """Store the frozen matrices (Linear and conv weights) in `dtype` once: under bf16 autocast they are then not
    recast at every step, and take half the memory. The trained tensors stay fp32 masters (so do their optimizer
    state and EMA), and so do pos_embed and the class table, which enter the fp32 residual stream unrounded."""
    for name, p in model.named_parameters():
        if not p.requires_grad and p.ndim >= 2 and name != "pos_embed" and not name.endswith("embedding_table.weight"):
            p.data = p.data.to(dtype)
    return model

# -----------------------------------------------------------------------------
# deltas: the one file format of a fine-tuned model. A delta is a dict
#   {"spec": make_spec's dict, "config": the model config the base is built with, "base": where the base is, "params": name -> tensor}
# written as .safetensors (tensors, the rest as JSON metadata); ckpt.pt embeds the same dict. Older .pt deltas still load.

ROOT = os.path.dirname(os.path.abspath(__file__))  # shipped bases (assets/) are named relative to the repo

def base_ref(path):
    """How a delta names its base: 'scratch' and published names as they are, a file in this repo relative to the
    repo (so the delta loads from any working directory), any other file by its absolute path."""
    if path == "scratch" or (published(path) and not os.path.exists(path)):
        return path
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else full

def base_path(ref):
    """What load_model takes for a delta's base (base_ref's inverse): names as they are, a repo-relative path in this repo."""
    return ref if ref == "scratch" or published(ref) or os.path.isabs(ref) else os.path.join(ROOT, ref)

def trainable_state_dict(model):
    """name -> tensor for every parameter that trains (γ included): what a delta stores."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

@torch.no_grad()
def copy_params(model, params):
    """Copy name -> tensor into the model's parameters of those names (any device and dtype)."""
    named = dict(model.named_parameters())
    for k, v in params.items():
        named[k].copy_(v)

def make_delta(params, spec, config, base):
    """The delta dict (see above) of the trained tensors `params`, as fp32 CPU copies."""
    return dict(spec=spec, config=config, base=base, params={k: v.detach().float().cpu().clone() for k, v in params.items()})

def save_delta(path, delta):
    write_safetensors(path, delta["params"], {"format": "difffit-delta", "base": delta["base"],
                                              **{k: json.dumps(delta[k]) for k in ("spec", "config")}})

def read_delta(path):
    """A delta file (.safetensors, or the .pt of earlier versions) -> the delta dict."""
    data = load_file(path, "delta")
    if isinstance(data, tuple):  # safetensors
        params, meta = data
        if meta.get("format") != "difffit-delta":
            raise ValueError(f"delta {path}: not a delta (a .safetensors file without difffit's metadata: a model? use --ckpt)")
        return dict(spec=json.loads(meta["spec"]), config=json.loads(meta["config"]), base=meta["base"], params=params)
    if not (isinstance(data, dict) and {"spec", "params", "config", "ckpt"} <= data.keys()):
        what = "a training checkpoint: pass its run's delta.safetensors" if isinstance(data, dict) and "opt" in data else "not a delta"
        raise ValueError(f"delta {path}: {what}")
    spec = dict(data["spec"])
    spec.setdefault("fingerprint", spec.pop("base", None))  # renamed
    return dict(spec=spec, config=data["config"], base=data["ckpt"], params=data["params"])

def load(delta, base=None):
    """Base + delta -> (model, delta): load the base the delta names (or `base`), check it is the one the delta was
    trained on, redo the surgery, load the trained tensors. `delta` is a path or a delta dict."""
    delta = read_delta(delta) if isinstance(delta, str) else delta
    check_method(delta["spec"])  # before the base is loaded (or downloaded)
    path = base or base_path(delta["base"])
    if path != "scratch" and not published(path) and not os.path.exists(path):  # published ones download on demand
        raise FileNotFoundError(f"the delta's base {path} is missing: pass --base with the checkpoint it was trained from")
    model, _, _ = load_model(path, delta["config"], input_size=delta["config"]["input_size"])
    apply_delta(model, delta)
    return model, delta

def apply_delta(model, delta):
    """Apply a delta to a freshly loaded base model: check the base, redo the surgery, load the tensors."""
    spec, params = delta["spec"], delta["params"]
    if spec["fingerprint"] is not None and fingerprint(model) != spec["fingerprint"]:
        raise ValueError(f"this delta was trained on another base model (fingerprint {spec['fingerprint']}, "
                         f"this base is {fingerprint(model)}): load the base checkpoint it was trained from")
    names = apply(model, spec)
    if sorted(names) != sorted(params):
        missing, extra = sorted(set(names) - set(params)), sorted(set(params) - set(names))
        raise ValueError(f"delta does not fit its own spec {spec['method']}: missing {missing[:3]}, unexpected {extra[:3]}")
    copy_params(model, params)
    return model

# -----------------------------------------------------------------------------
# merge: fold γ into the neighbouring linear layers, export a plain DiT state dict

def mergeable(model):
    """Whether merge() can fold the method into a plain DiT: not adapters or prompts, modules a plain DiT lacks."""
    return not any(isinstance(m, (AdaptedMlp, PromptedBlock)) for m in model.modules())

@torch.no_grad()
def merge(model):
    """A state dict in the published key layout with γ and LoRA folded in; loads into a plain DiT(num_classes=K)."""
    if not mergeable(model):
        raise ValueError("adapters and prompts are modules a plain DiT does not have, so they cannot be merged: "
                         "sample from the base and the delta instead (sample.py --delta delta.safetensors)")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "gamma" not in k and ".lora_" not in k}
    def fold(prefix, gamma):  # γ ⊙ (W x + b) = (diag(γ) W) x + γ ⊙ b
        if gamma is not None:
            sd[prefix + ".weight"].mul_(gamma[:, None])
            sd[prefix + ".bias"].mul_(gamma)
    for i, block in enumerate(model.blocks):
        if isinstance(block.attn.qkv, LoRALinear):  # W x + B A x = (W + B A) x
            sd[f"blocks.{i}.attn.qkv.weight"] += block.attn.qkv.lora_b @ block.attn.qkv.lora_a
        fold(f"blocks.{i}.attn.qkv", block.attn.gamma_qkv)
        fold(f"blocks.{i}.attn.proj", block.gamma_attn)  # gate is per-channel too, so γ commutes with it
        fold(f"blocks.{i}.mlp.fc2", block.gamma_mlp)
    fold("final_layer.linear", model.final_layer.gamma)
    return sd

# -----------------------------------------------------------------------------
# 256 -> 512: the positional-encoding trick (paper §4.3)

@torch.no_grad()
def interpolate_pos_embed(model, base_grid):
    """Evaluate the sin-cos table at (i/s, j/s) so a larger grid lines up with the grid it was trained on."""
    grid = model.input_size // model.patch_size
    table = get_2d_sincos_pos_embed(model.hidden_size, grid, scale=grid / base_grid)
    model.pos_embed.data.copy_(table[None])  # (1, T, D); copy_ casts to the parameter's dtype

# -----------------------------------------------------------------------------
# parameter accounting like the paper's Table 1

TABLE1 = {"full": "673.8M", "bitfit": "0.61M", "difffit": "0.83M", "lora-r8": "1.15M", "lora-r16": "2.18M",
          "adapt-parallel": "4.28M", "adapt-sequential": "4.28M", "vpt-deep": "2.81M"}  # DiT-XL/2, Table 1

def main():
    parser = argparse.ArgumentParser(description="Trainable parameters of each fine-tuning method (built on the meta device), "
                                                 "or --export a delta as a diffusers DiTTransformer2DModel folder.")
    parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models), help="DiT configuration (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=256, help="image resolution (latents are /8) (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=101, help="classes of the new dataset (Food-101: 101) (default: %(default)s)")
    parser.add_argument("--export", default=None, metavar="DELTA", help="merge this delta into its base and write it as a diffusers folder")
    parser.add_argument("--base", default=None, help="with --export: the delta's base, if it is no longer where the delta says")
    parser.add_argument("--out", default=None, help="with --export: the folder to write (config.json + diffusion_pytorch_model.safetensors)")
    parser.error = lambda msg: die(f"{msg} (see --help)")  # argparse's own complaints as one line too, without the usage block
    args = parser.parse_args()
    out, patch = unwritable(args.out) if args.out else None, int(args.model.split("/")[1])  # DiT-S/2 -> 2
    check_flags(args, [
        ("--image-size", args.image_size >= 8 and args.image_size % (8 * patch) == 0,
         f"the latents are /8 and {args.model}'s patches {patch} wide: use a positive multiple of {8 * patch} (256)"),
        ("--num-classes", args.num_classes >= 1, "use at least 1 class"),
        ("--export", args.export is None or os.path.isfile(args.export), "no such file: pass the delta.safetensors a run of train.py wrote"),
        ("--export", args.export is None or args.out, "needs --out DIR, the folder to write"),
        ("--out", args.out is None or args.export, "only --export writes a folder: add --export DELTA, or drop --out"),
        ("--out", out is None, f"{out}: pass an --out you can write to"),
        ("--base", args.base is None or args.export, "only --export loads a delta's base: add --export DELTA, or drop --base"),
        ("--base", args.base in (None, "scratch") or published(args.base) or os.path.exists(args.base), "no such file: pass the delta's base checkpoint"),
    ])
    if args.export:  # DiTPipeline.from_pretrained needs a VAE and scheduler beside it: see the README
        model, delta = load(args.export, base=args.base)
        write_diffusers_dit(merge(model), {**delta["config"], "num_classes": delta["spec"]["num_classes"]}, args.out)
        print(f"wrote {args.out}/config.json and diffusion_pytorch_model.safetensors ({delta['spec']['num_classes']} classes)")
        return
    rows = []
    for method in METHODS:
        with torch.device("meta"):
            model = DiT_models[args.model](input_size=args.image_size // 8)
        apply(model, make_spec(model, method, args.num_classes))
        rows.append((method, sum(p.numel() for p in model.parameters() if p.requires_grad)))
    total = dict(rows)["full"]
    print(f"{args.model} @ {args.image_size}px, {args.num_classes} classes (pos_embed is fixed and excluded)")
    print(f"{'method':<17} {'trainable':>13} {'%':>8}  paper (Table 1, XL/2)")
    for method, n in rows:
        print(f"{method:<17} {n:>13,} {100 * n / total:>7.2f}%  {TABLE1.get(method, '') if args.model == 'DiT-XL/2' else ''}")

def die(msg):
    """Bad input: one `error:` line and exit code 2, as in every script here."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)

if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, or a folder that cannot be written: one line, exit code 2
        die(str(e))
