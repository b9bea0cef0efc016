"""
Sample from a (fine-tuned) DiT with classifier-free guidance: a PNG grid, or a sample set for FID.

DiffFit: Xie et al. 2023, arXiv:2304.06648. DiT: Peebles & Xie 2022, arXiv:2212.09748.

    python sample.py                                             # the latest run in results/ -> its sample.png
    python sample.py --delta results/000-food101-difffit/delta.pt --classes 0,1,2 --cfg-scale 4.0
    python sample.py --ckpt pretrained/DiT-XL-2-256x256.pt --classes 207,360,387,974   # a published model
    torchrun --nproc_per_node=8 sample.py --delta ... --num-fid-samples 50000 --cfg-scale 1.5   # FID set
    torchrun --nproc_per_node=8 sample.py --ckpt pretrained/DiT-XL-2-256x256.pt --num-bank-samples 10000 --cfg-scale 1.5
                                                                 # a Diff-Tuning knowledge bank (train.py --diff-tuning)
"""
import argparse
import contextlib
import glob
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import difffit
from diffusion import create_diffusion
import models
from models import DiT_models, load_model

parser = argparse.ArgumentParser(description="Sample a DiT (base + DiffFit delta, or a full checkpoint) with CFG.")
# what to sample from
parser.add_argument("--delta", default=None, help="a delta.pt written by train.py (default: the latest run's)")
parser.add_argument("--ckpt", default=None, help="a full checkpoint instead: model.pt of a run, or a published DiT .pt")
parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models), help="config of a published (raw) checkpoint")
parser.add_argument("--image-size", type=int, default=256, choices=[256, 512], help="resolution of a published checkpoint")
parser.add_argument("--vae", default="ema", choices=["ema", "mse"], help="SD VAE decoder for latent models (DiT's FIDs: ema)")
parser.add_argument("--results-dir", default="results", help="where to look for the latest run")
# sampling
parser.add_argument("--classes", default=None, help="comma-separated class ids (default: every class)")
parser.add_argument("--per-class", type=int, default=1, help="samples per class in the grid")
parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (paper: 4.0 for pictures, 1.5 for FID)")
parser.add_argument("--guide-all-channels", action="store_true", help="guide all 4 latent channels (DiT guides the first 3)")
parser.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ancestral DDPM or deterministic DDIM (eta 0)")
parser.add_argument("--steps", default="250", help="sampling steps, or any respacing such as '10,15,20' (DiT: 250 DDPM steps)")
parser.add_argument("--seed", type=int, default=0, help="same seed, same samples")
parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast for speed")
parser.add_argument("--out", default=None, help="path of the grid PNG (default: sample.png next to the delta), or of the bank .npy")
# FID sample sets
parser.add_argument("--num-fid-samples", type=int, default=0, help="write this many samples for FID instead of a grid")
parser.add_argument("--fid-dir", default=None, help="folder of the FID samples (PNGs + a .npz beside it)")
parser.add_argument("--batch-size", type=int, default=32, help="samples per forward pass and rank")
# Diff-Tuning knowledge bank
parser.add_argument("--num-bank-samples", type=int, default=0, help="write this many samples, undecoded, as a knowledge bank for train.py --diff-tuning")

# -----------------------------------------------------------------------------

def latest_delta(results_dir):
    runs = sorted(glob.glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*", "delta.pt")))
    if not runs:
        raise FileNotFoundError(f"no finished run in {results_dir}/: run `python train.py` first, or pass --delta / --ckpt")
    return runs[-1]

def load(args):
    """The model to sample from, and the folder its outputs go next to."""
    if args.ckpt:
        raw = dict(model=args.model, input_size=args.image_size // 8, in_channels=4, num_classes=1000)
        return load_model(args.ckpt, raw), os.path.dirname(args.ckpt)
    path = args.delta or latest_delta(args.results_dir)
    delta = torch.load(path, map_location="cpu", weights_only=True)
    model = load_model(delta["ckpt"], delta["config"], input_size=delta["config"]["input_size"])
    difffit.load_delta(model, delta)
    return model, os.path.dirname(path)

@torch.no_grad()
def generate(model, diffusion, labels, cfg_scale, seed=0, sampler="ddpm", vae=None, guide_channels=3, progress=False, raw=False):
    """uint8 images (N, H, W, 3) for the given labels, or with raw=True the sampler's float output (N, C, H, W):
    latents, or pixels in [-1, 1] for a pixel-space model. Deterministic given the seed."""
    device = next(model.parameters()).device
    n, c, s = len(labels), model.in_channels, model.input_size
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, s, s, generator=g).to(device)
    y = torch.as_tensor(labels, device=device)
    if cfg_scale != 1:  # batched CFG: [conditional half; unconditional half with the null class]
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, model.num_classes)])
        fn = lambda x, t, y: model.forward_with_cfg(x, t, y, cfg_scale, guide_channels)
    else:
        fn = model.forward
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG stays as it was
        torch.manual_seed(seed)  # the noise drawn at each DDPM step
        pixels = c == 3  # the toy's pixel-space DiT: clip x0 to [-1, 1] as ADM does for images; latents are not clipped
        x = loop(fn, z.shape, z, clip_denoised=pixels, model_kwargs=dict(y=y), device=device, progress=progress)[:n]
    if raw:
        return x.float().cpu()
    if vae is not None:  # latents -> pixels
        x = vae.decode(x.float() / models.VAE_SCALE)
    return (127.5 * x.float() + 128).clamp(0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)  # DiT's rounding

def save_grid(images, path, nrow=8):
    """uint8 (N, H, W, 3) -> one PNG with 2-pixel white gaps."""
    n, h, w, _ = images.shape
    nrow = min(n, nrow)
    grid = np.full((math.ceil(n / nrow) * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images.numpy()):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2):r * (h + 2) + h + 2, 2 + c * (w + 2):c * (w + 2) + w + 2] = im
    Image.fromarray(grid).save(path)

def write_samples(model, diffusion, args, vae, out, rank, world, bank=False):
    """N samples, classes balanced (sample i has class i mod K), batches split over ranks. Sample batch b depends
    only on (seed, b), so an interrupted run resumes by skipping finished batches. For FID: one PNG per sample in
    the folder `out`, then an ADM .npz beside it. For a bank: the undecoded samples, one .npy per batch in
    `out`.parts/, then float32 (N, C, H, W) in `out` (what train.py --diff-tuning reads)."""
    parts = out + ".parts" if bank else out
    os.makedirs(parts, exist_ok=True)
    n, bs, k = args.num_bank_samples if bank else args.num_fid_samples, args.batch_size, model.num_classes
    batches = range(rank, math.ceil(n / bs), world)
    for b in (tqdm(batches, desc="bank" if bank else "fid samples") if rank == 0 else batches):
        ids = range(b * bs, min(n, (b + 1) * bs))
        files = [os.path.join(parts, f"{b:06d}.npy")] if bank else [os.path.join(parts, f"{i:06d}.png") for i in ids]
        if all(os.path.exists(f) for f in files):
            continue
        x = generate(model, diffusion, [i % k for i in ids], args.cfg_scale, seed=args.seed * 1_000_003 + b,
                     sampler=args.sampler, vae=vae, guide_channels=None if args.guide_all_channels else 3, raw=bank)
        for f, item in zip(files, [x.numpy()] if bank else x.numpy()):
            tmp = f[:-4] + ".tmp" + f[-4:]  # 000005.tmp.png
            if bank:
                np.save(tmp, item)
            else:
                Image.fromarray(item).save(tmp)
            os.replace(tmp, f)  # a file that exists is complete
    if world > 1:
        dist.barrier()
    if rank == 0:
        if bank:
            arr = np.concatenate([np.load(os.path.join(parts, f"{b:06d}.npy")) for b in range(math.ceil(n / bs))])
            np.save(out + ".tmp.npy", arr)
            os.replace(out + ".tmp.npy", out)
            shutil.rmtree(parts)
        else:  # the ADM evaluator's format: arr_0, uint8 (N, H, W, 3)
            arr = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:06d}.png"))) for i in range(n)])
            np.savez(out.rstrip("/") + ".npz", arr_0=arr)
        print(f"wrote {n} samples to {out}{'' if bank else '/ and ' + out.rstrip('/') + '.npz'} {tuple(arr.shape)}")

def main(args):
    # Setup: torchrun shares an FID sample set over ranks; a grid is one process.
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per rank, also for NCCL's barrier
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32: >3x faster sampling on A100 (DiT #25)
    torch.set_grad_enabled(False)

    # Load the model, the VAE (latent models), and the respaced diffusion.
    model, out_dir = load(args)
    model = model.to(device).eval()
    vae = models.load_vae(args.vae).to(device).eval() if model.in_channels == 4 else None
    diffusion = create_diffusion(f"ddim{args.steps}" if args.sampler == "ddim" and args.steps.isdigit() else args.steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    with autocast:
        setting = f"{args.sampler}{args.steps}-cfg{args.cfg_scale}-seed{args.seed}"
        if args.num_fid_samples:
            fid_dir = args.fid_dir or os.path.join(out_dir, f"fid-{args.num_fid_samples}-{setting}")
            write_samples(model, diffusion, args, vae, fid_dir, rank, world)
        elif args.num_bank_samples:  # labels are balanced over the base's classes; train.py gives them the null label
            bank = args.out or os.path.join(out_dir, f"bank-{args.num_bank_samples}-{setting}.npy")
            write_samples(model, diffusion, args, None, bank, rank, world, bank=True)
        elif rank == 0:
            classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(model.num_classes))
            bad = [c for c in classes if not 0 <= c < model.num_classes]
            if bad:
                raise ValueError(f"--classes {bad} out of range: this model has classes 0..{model.num_classes - 1}")
            labels = [c for c in classes for _ in range(args.per_class)]
            images = generate(model, diffusion, labels, args.cfg_scale, args.seed, args.sampler, vae,
                              None if args.guide_all_channels else 3, progress=True)
            out = args.out or os.path.join(out_dir, "sample.png")
            save_grid(images, out, nrow=max(8, args.per_class) if args.per_class > 1 else 8)
            print(f"wrote {out} ({len(labels)} samples, {args.sampler} {args.steps} steps, cfg {args.cfg_scale}, seed {args.seed})")
    if ddp:
        dist.destroy_process_group()

if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
