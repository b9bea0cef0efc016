"""
DiffFit: which parameters of a pretrained DiT train, and everything that follows from that choice.

DiffFit (Xie et al. 2023, arXiv:2304.06648) freezes a pretrained DiT and trains only its biases, its class
embedding and new scale factors γ (initialised to 1) on some blocks. This file does that model surgery after
the base weights are loaded, counts parameters the way the paper's tables do, saves and loads the few-MB
deltas, folds γ back into plain DiT weights, and interpolates the position table for 256 -> 512 transfer.

    python difffit.py --model DiT-XL/2 --num-classes 101   # parameter table (meta device, no memory)
"""
import argparse
import hashlib

import torch
import torch.nn as nn

from models import DiT_models, get_2d_sincos_pos_embed

# -----------------------------------------------------------------------------
# which parameters train

def _gamma(n, like):
    """A DiffFit scale factor: starts at 1, so the surgery leaves the model's function unchanged."""
    return nn.Parameter(torch.ones(n, device=like.device, dtype=like.dtype))

def full(model, spec):
    """Full fine-tuning: every parameter trains, except the fixed sin-cos pos_embed."""
    for name, p in model.named_parameters():
        p.requires_grad = name != "pos_embed"

def bitfit(model, spec):
    """BitFit (Zaken et al. 2021): biases and the class embedding (Algorithm 2 without γ)."""
    # Algorithm 2 also unfreezes normalisation parameters; DiT's LayerNorms have no affine parameters,
    # so there is nothing to unfreeze there.
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(".bias") or name.startswith("y_embedder.")

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
    bitfit(model, spec)
    for name, p in model.named_parameters():
        if "gamma" in name:
            p.requires_grad = True

METHODS = {"full": full, "bitfit": bitfit, "difffit": difffit}

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
                base=fingerprint(model))

def apply(model, spec):
    """Freeze the base, resize the class table to the new dataset, add the method's parameters."""
    if spec.get("base_grid") and spec["base_grid"] != model.input_size // model.patch_size:
        interpolate_pos_embed(model, spec["base_grid"])
    if spec["new_labels"]:
        new_label_table(model, spec["num_classes"])
    METHODS[spec["method"]](model, spec)
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

# -----------------------------------------------------------------------------
# deltas: the trained tensors only

def trainable_state_dict(model):
    """name -> tensor for every parameter that trains (γ included): what a delta stores."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

def make_delta(model, spec, params=None):
    """A delta is plain dicts and tensors, so it loads with weights_only=True."""
    params = trainable_state_dict(model) if params is None else params
    return {"spec": spec, "params": {k: v.detach().cpu().clone() for k, v in params.items()}}

def load_delta(model, delta):
    """Apply a delta to a freshly loaded base model: check the base, redo the surgery, load the tensors."""
    spec, params = delta["spec"], delta["params"]
    if spec["base"] is not None and fingerprint(model) != spec["base"]:
        raise ValueError(f"this delta was trained on another base model (fingerprint {spec['base']}, "
                         f"this base is {fingerprint(model)}): load the base checkpoint it was trained from")
    names = apply(model, spec)
    if sorted(names) != sorted(params):
        missing, extra = sorted(set(names) - set(params)), sorted(set(params) - set(names))
        raise ValueError(f"delta does not fit its own spec {spec['method']}: missing {missing[:3]}, unexpected {extra[:3]}")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in params.items():
            named[k].copy_(v)
    return spec

# -----------------------------------------------------------------------------
# merge: fold γ into the neighbouring linear layers, export a plain DiT state dict

@torch.no_grad()
def merge(model):
    """A state dict in the published key layout with γ folded in; loads into a plain DiT(num_classes=K)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "gamma" not in k}
    def fold(prefix, gamma):  # γ ⊙ (W x + b) = (diag(γ) W) x + γ ⊙ b
        if gamma is not None:
            sd[prefix + ".weight"].mul_(gamma[:, None])
            sd[prefix + ".bias"].mul_(gamma)
    for i, block in enumerate(model.blocks):
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
    model.pos_embed.data.copy_(torch.as_tensor(table, dtype=model.pos_embed.dtype).reshape(model.pos_embed.shape))

# -----------------------------------------------------------------------------
# parameter accounting like the paper's Table 1

def main():
    parser = argparse.ArgumentParser(description="Trainable parameters of each fine-tuning method (built on the meta device).")
    parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models), help="DiT configuration")
    parser.add_argument("--image-size", type=int, default=256, help="image resolution (latents are /8)")
    parser.add_argument("--num-classes", type=int, default=101, help="classes of the new dataset (Food-101: 101)")
    args = parser.parse_args()
    rows = []
    for method in METHODS:
        with torch.device("meta"):
            model = DiT_models[args.model](input_size=args.image_size // 8)
        apply(model, make_spec(model, method, args.num_classes))
        rows.append((method, sum(p.numel() for p in model.parameters() if p.requires_grad)))
    total = dict(rows)["full"]
    print(f"{args.model} @ {args.image_size}px, {args.num_classes} classes (pos_embed is fixed and excluded)")
    print(f"{'method':<10} {'trainable':>13} {'%':>8}")
    for method, n in rows:
        print(f"{method:<10} {n:>13,} {100 * n / total:>7.2f}%")

if __name__ == "__main__":
    main()
