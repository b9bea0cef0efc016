"""
Training and sampling speed of this repo, measured side by side with a reference-style loop (written the way DiT's
train.py and ADM's sampler work) on the same model and data, in one run. DiffFit: Xie et al. 2023, arXiv:2304.06648.

    python bench.py                                                   # DiT-S/2, 256 px, batch 16: training
    python bench.py --model DiT-B/2 --iters 1                         # the same for DiT-B/2
    python bench.py --what memory --model DiT-XL/2 --batch-size 4     # peak memory, a fresh process per row
    python bench.py --what sample --batch-size 2 --samplers ddpm250,dpm++20   # sampling with CFG vs reference DDPM-250
    python bench.py --vae --methods difffit --batch-size 4            # also encode with the VAE every step
    python bench.py --profile difffit                                 # where one DiffFit step spends its time

The reference style is DiT's train.py with today's timm (fused SDPA attention), fp32: AdamW over every parameter, an
EMA of the whole model, unfused adaLN arithmetic, the diffusion tables copied at every lookup. Ours is train.py: bf16
autocast where the hardware has it with the frozen weights stored in bf16, AdamW and one fused EMA over the trained
tensors only. Weights and latents are random: speed does not depend on their values, and reading a latent cache is a copy. The VAE
rows encode random images with a random-weight SD VAE of the published config (83.7M parameters). Rows take turns
(round-robin, --rounds times) and the median is reported, so all rows share whatever else the machine is doing.
"""
import argparse
import contextlib
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import difffit
import files
import models
from diffusion import GaussianDiffusion, create_diffusion
from models import DiT_models
from sample import LOOPS, generate, make_diffusion

parser = argparse.ArgumentParser(description="img/s, TFLOP/s and peak memory of training and sampling, vs a reference-style loop.")
# what to measure
parser.add_argument("--what", default="train", choices=["train", "memory", "sample"],
                    help="training speed, training peak memory, or sampling speed (default: %(default)s)")
parser.add_argument("--model", default="DiT-S/2", choices=list(DiT_models), help="DiT config (random weights) (default: %(default)s)")
parser.add_argument("--image-size", type=int, default=256, help="image resolution (latents are /8) (default: %(default)s)")
parser.add_argument("--batch-size", type=int, default=16, help="images per step (sampling: images per call, CFG doubles it) (default: %(default)s)")
parser.add_argument("--num-classes", type=int, default=101, help="classes of the new dataset (Food-101: 101) (default: %(default)s)")
parser.add_argument("--methods", default="full,bitfit,difffit", help="comma-separated fine-tuning methods to run (default: %(default)s)")
parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "both"],
                    help="our rows: bf16 autocast where the hardware has it (auto), fp32, bf16, or both side by side (default: %(default)s)")
parser.add_argument("--vae", action="store_true", help="add rows that encode images with the VAE every step (slow on CPUs)")
parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
# timing
parser.add_argument("--iters", type=int, default=2, help="timed training steps per row and round (default: %(default)s)")
parser.add_argument("--warmup", type=int, default=1, help="untimed training steps (or 2-step sampling calls) per row first (default: %(default)s)")
parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over the rows; the median is reported (default: %(default)s)")
parser.add_argument("--samplers", default="ddpm250",
                    help="--what sample: our rows, comma-separated sampler+steps as sample.py's, e.g. ddpm250,dpm++20 (default: %(default)s)")
parser.add_argument("--ref-steps", default="250", help="--what sample: DDPM steps of the reference-style loop (DiT's sample.py: 250) (default: %(default)s)")
parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (default: %(default)s)")
parser.add_argument("--profile", default=None, metavar="ROW", help="instead of the table: where one step of this row (e.g. 'difffit') spends its time")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # --what memory: the one row this process runs

# -----------------------------------------------------------------------------
# the reference style: what this repo does differently, undone

class RefBlock(models.DiTBlock):
    """DiT's block as its models.py writes it: modulate, gate and γ as separate elementwise ops (attention is timm's
    fused SDPA, which models.attention is in fp32)."""

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        modulate = lambda h, shift, scale: h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        a = self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_msa.unsqueeze(1) * (a if self.gamma_attn is None else self.gamma_attn * a)
        m = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp.unsqueeze(1) * (m if self.gamma_mlp is None else self.gamma_mlp * m)

class RefDiffusion(GaussianDiffusion):
    """ADM's table lookups: the float64 table is copied to the device at every lookup, then indexed and cast."""

    def _on(self, name, device):
        return torch.as_tensor(getattr(self, name)).to(device)

    def _at(self, name, t, x):
        return self._on(name, t.device)[t].float().view(-1, *[1] * (x.dim() - 1))

def build(method, ref, device, args):
    """A random-weight DiT after the surgery of `method`; ref: with the reference's blocks."""
    torch.manual_seed(0)
    with device:  # built in place: on the meta device it costs nothing (FLOP counting)
        model = DiT_models[args.model](input_size=args.image_size // 8, num_classes=1000)
    for block in model.blocks if ref else []:
        block.__class__ = RefBlock  # same parameters, unfused forward
    difffit.apply(model, difffit.make_spec(model, method, args.num_classes))
    return model.train()

def diffusion_for(respacing, ref):
    diffusion = create_diffusion(respacing)
    if ref:
        diffusion.__class__ = RefDiffusion  # the same tables, looked up the reference's way
    return diffusion

# -----------------------------------------------------------------------------
# the rows: a name like "ref difffit", "difffit bf16", "difffit +vae" or "full compile" says what runs

def method_of(row):
    return next(w for w in row.split() if w in difffit.METHODS)

def trainer(row, device, args):
    """One training step of `row` as a closure on fixed random data; step(False) skips optimizer and EMA."""
    ref, compiled, bf16 = row.startswith("ref"), "compile" in row, "bf16" in row
    model = build(method_of(row), ref, device, args)
    if bf16:  # as train.py
        difffit.store_frozen(model, torch.bfloat16)
    trained = [p for p in model.parameters() if p.requires_grad]
    if ref:  # DiT's train.py: AdamW over all parameters, an EMA of the whole model updated tensor by tensor
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        ema, params = [p.detach().clone() for p in model.parameters()], list(model.parameters())
        update_ema = lambda: [e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999) for e, p in zip(ema, params)]
    else:  # train.py: AdamW and EMA over the trained tensors only, the EMA in one fused kernel
        opt = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0, fused=device.type == "cuda")
        ema = [p.detach().clone() for p in trained]
        update_ema = lambda: torch._foreach_lerp_(ema, [p.detach() for p in trained], 1 - 0.9999)
    diffusion = diffusion_for("", ref)
    net = torch.compile(model) if compiled else model
    # torch.autocast refuses the meta device even when disabled; FLOP counting there (train_flops) counts the same in any precision
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and device.type != "meta" else contextlib.nullcontext()
    B, s = args.batch_size, args.image_size // 8
    x0, y = torch.randn(B, 4, s, s, device=device), torch.randint(0, args.num_classes, (B,), device=device)
    if "+vae" in row:
        with device:
            vae = models.AutoencoderKL().eval()
        images = torch.rand(B, 3, 8 * s, 8 * s, device=device) * 2 - 1

    def step(optimize=True):
        x = x0
        if "+vae" in row:  # DiT's train.py: encode the batch every step, then sample the posterior
            with torch.no_grad(), autocast:
                mean, std = vae.encode(images)
            x = (mean + std * torch.randn_like(std)) * models.VAE_SCALE
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=device)
        with autocast:
            loss = diffusion.training_losses(net, x, t, dict(y=y))["loss"].mean()
        loss.backward()
        if optimize:
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                update_ema()
        return loss
    step.model = model
    return step

def sampler(row, device, args):
    """One call of sample.py's generate (or of the reference-style loop) as a closure; run(2) samples 2 steps."""
    ref, bf16 = row.startswith("ref"), "bf16" in row
    name, steps = ("ddpm", args.ref_steps) if ref else sampler_steps(row.split()[1])
    model = build("difffit", ref, device, args).eval()
    labels = [i % args.num_classes for i in range(args.batch_size)]

    @torch.no_grad()
    def run(warmup_steps=None):
        respacing = str(warmup_steps) if warmup_steps else steps
        if not ref:
            diffusion = make_diffusion(name, respacing)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return generate(model, diffusion, labels, args.cfg_scale, sampler=name)
        diffusion = diffusion_for(respacing, ref)
        # ADM's p_sample_loop as DiT's sample_ddp.py drives it: CFG on the doubled batch, plain calls at scale 1
        z = torch.randn(len(labels), 4, model.input_size, model.input_size, device=device)
        if args.cfg_scale == 1:
            return diffusion.p_sample_loop(model.forward, None, z, model_kwargs=dict(y=torch.tensor(labels, device=device)))
        y = torch.tensor(labels + [model.num_classes] * len(labels), device=device)
        return diffusion.p_sample_loop(model.forward_with_cfg, None, torch.cat([z, z]), model_kwargs=dict(y=y, cfg_scale=args.cfg_scale))
    return run

def sampler_steps(setting):
    """'dpm++20' -> ('dpm++', '20'), 'sde-dpm++10' -> ('sde-dpm++', '10'); None if no sampler of sample.py starts it."""
    name = next((s for s in LOOPS if setting.startswith(s)), None)  # no sampler's name starts another's
    return (name, setting[len(name):]) if name and setting[len(name):] else None

def matmul_peak(device, dtype, n=2048, k=8):
    """k n x n matmuls in dtype: the machine's achievable TFLOP/s, timed in the same rounds as the rows."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return lambda *_: [a @ b for _ in range(k)], 2 * n ** 3 * k

@torch.no_grad()
def sample_flops(args, row):
    """FLOPs of one sampling call: one model call per step, guided on the doubled batch unless the scale is 1 (on the meta device)."""
    cfg = args.cfg_scale != 1
    meta, n, s = torch.device("meta"), (1 + cfg) * args.batch_size, args.image_size // 8
    model = build("difffit", False, meta, args).eval()
    x, t = torch.empty(n, 4, s, s, device=meta), torch.zeros(n, dtype=torch.long, device=meta)
    with FlopCounterMode(display=False) as counter:
        if cfg:
            model.forward_with_cfg(x, t, t, args.cfg_scale)
        else:
            model(x, t, t)
    name, steps = ("ddpm", args.ref_steps) if row.startswith("ref") else sampler_steps(row.split()[1])
    return counter.get_total_flops() * make_diffusion(name, steps).num_timesteps

def train_flops(row, args):
    """FLOPs of one training step (forward and backward; the optimizer's are negligible), on the meta device."""
    with FlopCounterMode(display=False) as counter:
        trainer(row.replace(" compile", ""), torch.device("meta"), args)(optimize=False)
    return counter.get_total_flops()

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()

# -----------------------------------------------------------------------------

def die(msg):
    """Bad input: one `error:` line and exit code 2, as in every script here."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)

parser.error = lambda msg: die(f"{msg} (see --help)")  # argparse's own complaints as one line too, without the usage block

def check_args(args):
    """Every flag before a model is built: ValueError('--flag value: what is wrong; what to do')."""
    for flag, settings in (("--samplers", args.samplers.split(",")), ("--ref-steps", ["ddpm" + args.ref_steps])):
        for s in settings:
            m = sampler_steps(s)
            if not m:
                raise ValueError(f"{flag} {s}: expected a sampler ({', '.join(LOOPS)}) followed by its steps, e.g. ddpm250 or dpm++20")
            try:
                make_diffusion(*m)
            except ValueError as e:
                raise ValueError(f"{flag} {s}: {e}") from None
    patch, words = int(args.model.split("/")[1]), (args.profile or "").split()  # DiT-S/2 -> 2; 'difffit bf16' -> its words
    files.check_flags(args, [
        ("--image-size", args.image_size >= 8 and args.image_size % (8 * patch) == 0,
         f"the latents are /8 and {args.model}'s patches {patch} wide: use a positive multiple of {8 * patch} (256)"),
        ("--batch-size", args.batch_size >= 1, "use at least 1 image per step"),
        ("--num-classes", args.num_classes >= 1, "use at least 1 class"),
        ("--methods", all(m in difffit.METHODS for m in args.methods.split(",")), f"comma-separated names of {', '.join(difffit.METHODS)}"),
        ("--iters", args.iters >= 1, "time at least 1 step"),
        ("--warmup", args.warmup >= 0, "use 0 or more warm-up steps"),
        ("--rounds", args.rounds >= 1, "use at least 1 round"),
        ("--cfg-scale", math.isfinite(args.cfg_scale), "use a finite guidance scale"),
        ("--vae", not args.vae or args.what != "sample", "the sampling rows do not encode: drop --vae"),
        ("--profile", args.profile is None or (sum(w in difffit.METHODS for w in words) == 1 and
                                                 all(w in (*difffit.METHODS, "ref", "bf16", "compile", "+vae") for w in words)),
         f"a training row: one method ({', '.join(difffit.METHODS)}), with any of ref, bf16, compile, +vae, e.g. 'difffit bf16 compile'"),
    ])

def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py and sample.py
    if args.profile:  # the operators that take the time of one step (after a warm-up step)
        torch._inductor.config.cpp.enable_kernel_profile = True  # compiled rows: each fused CPU kernel by name
        step = trainer(args.profile, device, args)
        step()
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return
    if args.child:  # --what memory: one row for warmup + iters steps, then this process's peak
        step = trainer(args.child, device, args)
        for _ in range(args.warmup + args.iters):
            step()
        print(torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return

    # The rows: the reference-style loop of each method (fp32, cached latents), then ours in each precision.
    has_bf16 = models.native_bf16(device)
    precisions = {"auto": [" bf16" if has_bf16 else ""], "fp32": [""], "bf16": [" bf16"], "both": ["", " bf16"]}[args.precision]
    methods = args.methods.split(",")
    if args.what == "sample":
        rows = ["ref sample"] + [f"sample {s}{p}" for p in precisions for s in args.samplers.split(",")]
    else:
        rows = [f"ref {m}" for m in methods] + [f"{m}{p}" for p in precisions for m in methods]
        rows += [f"{methods[-1]}{p} +vae" for p in precisions if args.vae]
        rows += [f"{m}{p} compile" for p in precisions for m in methods if args.compile]
    ref_of = lambda row: "ref sample" if args.what == "sample" else f"ref {method_of(row)}"
    full_of = lambda row: None if args.what == "sample" else row.replace(method_of(row), "full")  # same setting, full fine-tuning
    print(f"{args.model} @ {args.image_size}px ({args.image_size // 8}x{args.image_size // 8} latents), batch {args.batch_size}, "
          f"{device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}, " +  # and what --precision auto chose
          (models.precision_note(args.precision, device) if args.precision != "both" else f"--precision both (native bf16: {has_bf16})"))
    if not has_bf16 and " bf16" in precisions:
        print(f"warning: no native bf16 on this {device.type}: the bf16 rows are emulated, far slower than fp32 (--precision fp32)",
              file=sys.stderr)

    w = max(22, *map(len, rows))  # the row names' column
    if args.what == "memory":  # a fresh process per row, so each peak is its own
        print(f"{'row':<{w}} {'peak GB':>8} {'vs ref':>7} {'vs full':>8}")
        peak = {}
        for row in rows:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", row], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{row} failed:\n{out.stderr}")
            peak[row] = int(out.stdout.split()[-1]) / 2**30
            vs_full = f"{peak[row] / peak[full_of(row)]:8.2f}" if full_of(row) in peak else f"{'':>8}"
            print(f"{row:<{w}} {peak[row]:8.2f} {peak[row] / peak[ref_of(row)]:7.2f} {vs_full}", flush=True)
        return

    # Build and warm up every row (sampling warms up on a 2-step chain), then time them in turns.
    steps = {row: (sampler if args.what == "sample" else trainer)(row, device, args) for row in rows}
    flops = {row: sample_flops(args, row) if args.what == "sample" else train_flops(row, args) for row in rows}
    steps["matmul peak"], flops["matmul peak"] = matmul_peak(device, torch.float32)
    if any("bf16" in row for row in rows):
        steps["matmul peak bf16"], flops["matmul peak bf16"] = matmul_peak(device, torch.bfloat16)
    for step in steps.values():
        for _ in range(args.warmup):
            step(2) if args.what == "sample" else step()
    reps = args.iters if args.what == "train" else 1
    times = {row: [] for row in steps}
    for _ in range(args.rounds):
        for row, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            sync(device)
            times[row].append((time.perf_counter() - t0) / reps)
    dt = {row: statistics.median(ts) for row, ts in times.items()}
    peak = {p: flops[p] / dt[p] / 1e12 for p in ("matmul peak", "matmul peak bf16") if p in dt}

    # The table: img/s, and ratios to the reference-style loop of the same method and to our full fine-tuning;
    # % peak is against the matmul peak of the row's precision.
    print(f"median of {args.rounds} rounds x {reps} {'sampling calls' if args.what == 'sample' else 'steps'} after {args.warmup} warm-up; "
          f"matmul peak (2048², timed in the same rounds): " + ", ".join(f"{v:.3f} TFLOP/s {'bf16' if 'bf16' in k else 'fp32'}" for k, v in peak.items()))
    unit = "s/call" if args.what == "sample" else "s/step"
    print(f"{'row':<{w}} {unit:>8} {'img/s':>8} {'vs ref':>8}" + (f" {'vs full':>8}" if args.what == "train" else "") + f" {'TFLOP/s':>8} {'% peak':>7}")
    for row in rows:
        tf = flops[row] / dt[row] / 1e12
        vs_full = "" if args.what == "sample" else f" {dt[row] / dt[full_of(row)]:8.2f}" if full_of(row) in dt else f" {'':>8}"
        pk = peak["matmul peak bf16" if "bf16" in row else "matmul peak"]
        print(f"{row:<{w}} {dt[row]:8.3f} {args.batch_size / dt[row]:8.3f} {dt[ref_of(row)] / dt[row]:7.2f}x{vs_full} {tf:8.3f} {100 * tf / pk:6.0f}%")

if __name__ == "__main__":
    try:
        args = parser.parse_args()
        check_args(args)
        main(args)
    except (ValueError, OSError) as e:  # bad input: one line, exit code 2
        die(str(e))
