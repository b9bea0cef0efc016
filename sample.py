"""
Sample from a (fine-tuned) DiT with classifier-free guidance: a PNG grid, a sample set for FID, or a Diff-Tuning bank.

DiffFit: Xie et al. 2023, arXiv:2304.06648. DiT: Peebles & Xie 2022, arXiv:2212.09748.

    python sample.py                                             # the latest run in results/ -> its sample.png
    python sample.py --delta results/000-food101-difffit/delta.safetensors --classes 0,1,2 --cfg-scale 4.0
    python sample.py --ckpt DiT-XL-2-256x256.pt --classes 207,360,387,974   # a published model (downloaded once)
    torchrun --nproc_per_node=8 sample.py --delta ... --num-fid-samples 10000 --steps 50        # Table 1's FID: 50 steps, CFG 1.5
    torchrun --nproc_per_node=8 sample.py --ckpt DiT-XL-2-256x256.pt --num-bank-samples 10000
                                                                 # a Diff-Tuning knowledge bank (train.py --diff-tuning)
"""
import argparse
import glob
import json
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
from files import Terminated, atomic_write, check_flags, exit_interrupted, exit_on_sigterm, launched_by_torchrun, peer_lost, published, unwritable
from models import VAE_SCALE, DiT_models, bf16_chosen, load_model, load_vae, precision_note, raw_config

# the sampler's loop in diffusion.py; every one makes one network call per kept step of the respaced chain
LOOPS = {"ddpm": "p_sample_loop", "ddim": "ddim_sample_loop", "dpm++": "dpm_solver_sample_loop", "sde-dpm++": "sde_dpm_solver_sample_loop"}

parser = argparse.ArgumentParser(description="Sample a DiT (base + DiffFit delta, or a full checkpoint) with CFG.")
# what to sample from
parser.add_argument("--delta", default=None, help="a delta written by train.py (default: the latest run's)")
parser.add_argument("--base", default=None, help="the base checkpoint of --delta, if it is no longer where the delta says")
parser.add_argument("--ckpt", default=None, help="a full checkpoint instead: model.safetensors of a run, or a published DiT .pt")
parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models), help="config of a published (raw) checkpoint (default: %(default)s)")
parser.add_argument("--image-size", type=int, default=256, choices=[256, 512], help="resolution of a published checkpoint (default: %(default)s)")
parser.add_argument("--vae", default="ema", help="SD VAE decoder for latent models: ema or mse (DiT's FIDs: ema), or a local file (default: %(default)s)")
parser.add_argument("--results-dir", default="results",
                    help="where to look for the latest run; the results of a model outside a run go here (default: %(default)s)")
# sampling
parser.add_argument("--classes", default=None, help="comma-separated class ids (default: every class)")
parser.add_argument("--per-class", type=int, default=1, help="samples per class in the grid (default: %(default)s)")
parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the paper's, 4.0 for grids, 1.5 for FID sets and banks)")
parser.add_argument("--guide-all-channels", action="store_true", help="guide all 4 latent channels (DiT guides the first 3)")
parser.add_argument("--sampler", default="ddpm", choices=list(LOOPS),
                    help="ancestral DDPM, deterministic DDIM, DPM-Solver++(2M) (an ODE), or its stochastic SDE variant (default: %(default)s)")
parser.add_argument("--steps", default="250",
                    help="network calls per sample: a step count (DiT: 250 DDPM steps), or a respacing like '10,15,20' (default: %(default)s)")
parser.add_argument("--seed", type=int, default=0, help="same seed and --batch-size, same samples (default: %(default)s)")
parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="bf16 autocast where the hardware has it (auto), always (bf16) or never (fp32) (default: %(default)s)")
parser.add_argument("--out", default=None,
                    help="path of the grid PNG (default: sample.png in the run, else --results-dir/<model>-sample.png), or of the bank .npy")
# FID sample sets and Diff-Tuning banks
parser.add_argument("--num-fid-samples", type=int, default=0, help="write this many samples for FID instead of a grid (default: %(default)s: a grid)")
parser.add_argument("--fid-dir", default=None, help="folder of the FID samples (PNGs + a .npz beside it)")
parser.add_argument("--num-bank-samples", type=int, default=0,
                    help="write this many samples, undecoded, as a knowledge bank for train.py --diff-tuning (default: %(default)s)")
parser.add_argument("--batch-size", type=int, default=32, help="samples per forward pass and rank (default: %(default)s)")

def die(msg):
    """Bad input: one `error:` line and exit code 2, as in every script here."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)

parser.error = lambda msg: die(f"{msg} (see --help)")  # argparse's own complaints as one line too, without the usage block

# -----------------------------------------------------------------------------

def make_diffusion(sampler, steps):
    """The respaced chain for a sampler: DDIM with a plain count takes ADM's even stride ("ddimN"), as ADM's image_sample.py does."""
    diffusion = create_diffusion(f"ddim{steps}" if sampler == "ddim" and steps.isdigit() else steps)
    if sampler in ("dpm++", "sde-dpm++"):
        diffusion.check_dpm_solver_steps()
    return diffusion

def latest_delta(results_dir):
    """The delta of the finished run with the highest number NNN-<name> (train.py numbers on past 999, as --resume latest)."""
    number = lambda f: os.path.basename(os.path.dirname(f)).split("-")[0]
    runs = [f for ext in ("safetensors", "pt") for f in glob.glob(os.path.join(results_dir, "*-*", f"delta.{ext}")) if number(f).isdigit()]
    if not runs:
        raise FileNotFoundError(f"no finished run in {results_dir}/: run `python train.py` first, or pass --delta / --ckpt")
    return max(runs, key=lambda f: (int(number(f)), f))

def guidance(args):
    """--cfg-scale, or the paper's for what is drawn (§4.1): 1.5 for evaluation (FID sets, and banks), 4.0 for grids."""
    return args.cfg_scale if args.cfg_scale is not None else 1.5 if args.num_fid_samples or args.num_bank_samples else 4.0

def output(args, src):
    """Where the results go: the grid PNG, the FID sample folder or the bank .npy; by default in the run folder of what
    is sampled (a run's delta or model), else in --results-dir under the model's name (not beside a base in pretrained/)."""
    folder = os.path.dirname(os.path.normpath(src))
    run = os.path.exists(os.path.join(folder or ".", "log.txt"))
    here, name = (folder, "") if run else (args.results_dir, os.path.basename(os.path.normpath(src)).split(".")[0] + "-")
    setting = f"{args.sampler}{args.steps}-cfg{guidance(args)}-seed{args.seed}"
    if args.num_fid_samples:
        return os.path.normpath(args.fid_dir) if args.fid_dir else os.path.join(here, f"{name}fid-{args.num_fid_samples}-{setting}")
    if args.num_bank_samples:
        return args.out or os.path.join(here, f"{name}bank-{args.num_bank_samples}-{setting}.npy")
    return args.out or os.path.join(here, f"{name}sample.png")

def check_args(args):
    """Every flag, and where the results go, before anything is loaded or drawn: ValueError('--flag value: why; what to do')."""
    sets = args.num_fid_samples or args.num_bank_samples  # balanced over all classes, not a grid
    check_flags(args, [
        ("--delta", args.delta is None or args.ckpt is None, "pass --delta (a fine-tuned delta) or --ckpt (a whole model), not both"),
        ("--delta", args.delta is None or os.path.isfile(args.delta), "no such file: pass the delta.safetensors a run of train.py wrote"),
        ("--base", args.base is None or args.ckpt is None, "--base is where the base of a --delta is; a --ckpt is a whole model: drop --base"),
        ("--base", args.base in (None, "scratch") or published(args.base) or os.path.exists(args.base),
         "no such file: pass the base checkpoint the delta was trained from"),
        ("--ckpt", args.ckpt is None or published(args.ckpt) or os.path.exists(args.ckpt),
         "no such file: pass a run's model.safetensors, a published DiT .pt or a diffusers DiT folder"),
        ("--vae", args.vae in ("ema", "mse") or os.path.exists(args.vae), "no such file: use ema, mse or the path of an SD VAE file"),
        ("--classes", args.classes is None or all(c.strip().isdigit() for c in args.classes.split(",")), "expected class ids like 0,1,2"),
        ("--classes", args.classes is None or not sets, "FID sample sets and banks cover every class in turn: drop --classes"),
        ("--per-class", args.per_class >= 1, "draw at least 1 sample per class"),
        ("--per-class", args.per_class == 1 or not sets, "FID sample sets and banks are sized by their count: drop --per-class"),
        ("--cfg-scale", math.isfinite(guidance(args)) and guidance(args) >= 0, "use a finite guidance scale >= 0 (1: none; pictures: 4.0; FID: 1.5)"),
        ("--seed", 0 <= args.seed < 2**32, "use a seed in 0 .. 2^32 - 1"),
        ("--num-fid-samples", args.num_fid_samples >= 0, "use 0 (a grid) or the number of samples to write"),
        ("--num-bank-samples", args.num_bank_samples >= 0, "use 0 (a grid) or the number of samples to write"),
        ("--num-bank-samples", not (args.num_fid_samples and args.num_bank_samples),
         "cannot go with --num-fid-samples: one run writes one set; drop one of them"),
        ("--fid-dir", args.fid_dir is None or args.num_fid_samples, "only FID sample sets go there: add --num-fid-samples, or drop --fid-dir"),
        ("--out", args.out is None or not args.num_fid_samples, "FID samples go to a folder: pass --fid-dir instead"),
        ("--out", args.out is None or args.out.endswith(".npy" if args.num_bank_samples else ".png"),
         "a bank is an .npy file: end the name in .npy" if args.num_bank_samples else "the grid is a PNG: end the name in .png"),
        ("--batch-size", args.batch_size >= 1, "use at least 1 sample per forward pass"),
    ])
    try:
        make_diffusion(args.sampler, args.steps)
    except ValueError as e:
        raise ValueError(f"--steps {args.steps} (--sampler {args.sampler}): {e}") from None
    src = args.ckpt or args.delta or latest_delta(args.results_dir)
    if args.classes:  # where the class count is known unloaded (a delta's, a published DiT's), before a download
        known = raw_config(args.model, args.image_size)["num_classes"] if published(src) else None if args.ckpt else \
            difffit.read_delta(src)["spec"]["num_classes"]
        check_classes(args.classes, known)
    out = output(args, src)
    flag = "--fid-dir" if args.num_fid_samples else "--out"
    why = unwritable(out if args.num_fid_samples else os.path.dirname(os.path.abspath(out)))
    if why or (os.path.isdir(out) and not args.num_fid_samples):
        raise ValueError(f"{flag} {out}: {why or 'a folder, not a file name'}; pass a {flag} you can write to")
    if args.num_bank_samples and os.path.exists(out):  # a finished bank (an unfinished one is out.parts/, and resumes)
        raise ValueError(f"--out {out}: a bank is there already; pass another --out, or delete it")
    if args.num_fid_samples and not os.path.exists(os.path.join(out, "settings.json")) and os.path.exists(out + ".npz"):
        raise ValueError(f"--fid-dir {out}: a new set, but {out}.npz, where its samples would go, is there already; "
                         "pass another --fid-dir, or delete that file")

def check_classes(classes, num_classes):
    """The class ids of --classes (all of them if None), each in range (unchecked where num_classes is None)."""
    ids = [int(c) for c in classes.split(",")] if classes else list(range(num_classes))
    if num_classes is not None and (bad := [c for c in ids if not 0 <= c < num_classes]):
        raise ValueError(f"--classes {bad} out of range: this model has classes 0..{num_classes - 1}")
    return ids

@torch.no_grad()
def generate(model, diffusion, labels, cfg_scale, seed=0, sampler="ddpm", guide_channels=3, progress=False):
    """Samples (N, C, H, W) float32 in the model's space (latents, or pixels in [-1, 1]) for the given labels.
    Deterministic given the seed; the caller's RNG is left as it was."""
    device = next(model.parameters()).device
    n, c, s = len(labels), model.in_channels, model.input_size
    z = torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.as_tensor(labels, device=device)
    if cfg_scale != 1:  # batched CFG: [conditional half; unconditional half with the null class]
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, model.num_classes)])
        fn = lambda x, t, y: model.forward_with_cfg(x, t, y, cfg_scale, guide_channels)
    else:
        fn = model.forward
    loop = getattr(diffusion, LOOPS[sampler])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the noise drawn at each DDPM step
        pixels = c == 3  # a pixel-space DiT (the toy): clip x0 to [-1, 1] as ADM does for images; latents are not clipped
        return loop(fn, z.shape, z, clip_denoised=pixels, model_kwargs=dict(y=y), device=device, progress=progress)[:n].float()

@torch.no_grad()
def to_images(x, vae=None):
    """Samples of generate -> uint8 images (N, H, W, 3) on the CPU; latents are decoded by the VAE first."""
    if vae is not None:
        x = vae.decode(x / VAE_SCALE)
    return (127.5 * x.float() + 128).clamp(0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)  # DiT's rounding

def save_grid(images, path, nrow=8):
    """uint8 (N, H, W, 3) -> one PNG with 2-pixel white gaps. Images under 128 px are shown 128 // H times larger
    (nearest neighbour), so a grid of 32-px toy samples is readable; FID sets keep their own pixels."""
    scale = max(1, 128 // images.shape[1])  # 32 px -> 4x, 256 px -> 1x
    images = images.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    n, h, w, _ = images.shape
    nrow = min(n, nrow)
    grid = np.full((math.ceil(n / nrow) * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images.numpy()):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2):r * (h + 2) + h + 2, 2 + c * (w + 2):c * (w + 2) + w + 2] = im
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))

def shard(n, batch_size, rank, world, seed):
    """This rank's batches of an n-sample set: (b, sample ids, noise seed). Batch b of --seed s is drawn with seed
    s·1_000_003 + b, so sets with different seeds share no batch and a set is the same over any number of ranks."""
    for b in range(rank, math.ceil(n / batch_size), world):
        yield b, range(b * batch_size, min(n, (b + 1) * batch_size)), seed * 1_000_003 + b

def sample_settings(args, src, bf16):
    """What decides the samples of an FID set or a bank: an interrupted set resumes only with all of them unchanged."""
    made = os.stat(src) if os.path.exists(src) else None  # the file as it is now: a retrained delta is another model
    return dict(model=os.path.abspath(src) if made else src, size=made and made.st_size, mtime_ns=made and made.st_mtime_ns,
                samples=args.num_fid_samples or args.num_bank_samples, batch_size=args.batch_size, sampler=args.sampler,
                steps=args.steps, cfg_scale=guidance(args), guide_all_channels=args.guide_all_channels, seed=args.seed,
                vae=args.vae, bf16=bf16)

def claim(folder, settings, flag):
    """Begin a sample set in folder, or resume the one there if its settings.json says it was begun with these settings."""
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            diff = ", ".join(f"{k} {old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v)
            raise ValueError(f"{flag} {folder}: holds samples drawn with other settings ({diff}); pass another {flag}, or delete it")
    elif os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{flag} {folder}: not empty, and not a sample set this script began; pass a new or empty folder")
    else:
        os.makedirs(folder, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))

def write_grid(model, diffusion, args, labels, vae, out):
    """A grid of samples of the labels, drawn --batch-size at a time as the sets are: every class of a 1000-class
    base is 1000 samples, more than one forward pass and one VAE decode should hold."""
    batches = list(shard(len(labels), args.batch_size, 0, 1, args.seed))
    images = []
    for _, ids, seed in tqdm(batches, desc="grid", disable=len(batches) == 1):  # one batch: a bar over its steps instead
        x = generate(model, diffusion, [labels[i] for i in ids], guidance(args), seed, args.sampler,
                     None if args.guide_all_channels else 3, progress=len(batches) == 1)
        images.append(to_images(x, vae))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_grid(torch.cat(images), out, nrow=args.per_class * max(1, 8 // args.per_class))  # whole classes per row, 8 wide or so

def write_fid_samples(model, diffusion, args, vae, out, rank, world):
    """N class-balanced samples as PNGs in `out`, then an ADM .npz (arr_0: uint8 N, H, W, 3) beside it. A PNG that
    exists is complete and is never redrawn, so an interrupted run resumes where it stopped (main claims the folder first)."""
    os.makedirs(out, exist_ok=True)
    n, k = args.num_fid_samples, model.num_classes
    for b, ids, seed in tqdm(list(shard(n, args.batch_size, rank, world, args.seed)), desc="fid samples", disable=rank != 0):
        files = [os.path.join(out, f"{i:06d}.png") for i in ids]
        if all(os.path.exists(f) for f in files):
            continue
        x = generate(model, diffusion, [i % k for i in ids], guidance(args), seed, args.sampler, None if args.guide_all_channels else 3)
        for f, im in zip(files, to_images(x, vae).numpy()):
            atomic_write(f, lambda fh: Image.fromarray(im).save(fh, format="PNG"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        arr = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:06d}.png"))) for i in range(n)])
        atomic_write(out + ".npz", lambda f: np.savez(f, arr_0=arr))
        print(f"wrote {n} samples to {out}/ and {out}.npz {tuple(arr.shape)}")

def write_bank(model, diffusion, args, out, rank, world):
    """N class-balanced samples, undecoded, as float32 (N, C, H, W) in `out` (what train.py --diff-tuning reads);
    finished batches wait in `out`.parts/ so an interrupted run resumes (main claims that folder first)."""
    parts = out + ".parts"
    os.makedirs(parts, exist_ok=True)
    n, k = args.num_bank_samples, model.num_classes
    for b, ids, seed in tqdm(list(shard(n, args.batch_size, rank, world, args.seed)), desc="bank", disable=rank != 0):
        f = os.path.join(parts, f"{b:06d}.npy")
        if not os.path.exists(f):
            x = generate(model, diffusion, [i % k for i in ids], guidance(args), seed, args.sampler, None if args.guide_all_channels else 3)
            atomic_write(f, lambda fh: np.save(fh, x.cpu().numpy()))
    if world > 1:
        dist.barrier()
    if rank == 0:
        files = [os.path.join(parts, f"{b:06d}.npy") for b in range(math.ceil(n / args.batch_size))]
        arr = np.concatenate([np.load(f) for f in files])
        atomic_write(out, lambda fh: np.save(fh, arr))
        shutil.rmtree(parts)  # the parts and their settings.json
        print(f"wrote {n} samples to {out} {tuple(arr.shape)}")

def main(args):
    # Every flag first, then setup: torchrun shares an FID sample set or a bank over ranks; a grid is one process.
    check_args(args)
    ddp = launched_by_torchrun()
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per rank, also for NCCL's barrier
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32: >3x faster sampling on A100 (DiT #25)

    # Where the samples go: an interrupted FID set or bank resumes, but only with the settings it was begun with.
    src = args.ckpt or args.delta or latest_delta(args.results_dir)
    out, bf16 = output(args, src), bf16_chosen(args.precision, device)
    if args.num_fid_samples or args.num_bank_samples:
        if rank == 0:
            claim(out if args.num_fid_samples else out + ".parts", sample_settings(args, src, bf16), "--fid-dir" if args.num_fid_samples else "--out")
        if world > 1:
            dist.barrier()

    # The respaced diffusion, the model and the VAE.
    diffusion = make_diffusion(args.sampler, args.steps)
    model = load_model(src, raw_config(args.model, args.image_size))[0] if args.ckpt else difffit.load(src, base=args.base)[0]  # whole, or base + delta
    model = model.to(device).eval()
    vae = load_vae(args.vae).to(device).eval() if model.in_channels == 4 else None
    if rank == 0:
        print(precision_note(args.precision, device), flush=True)

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if args.num_fid_samples:
            write_fid_samples(model, diffusion, args, vae, out, rank, world)
        elif args.num_bank_samples:  # labels are balanced over the base's classes; train.py gives them the null label
            write_bank(model, diffusion, args, out, rank, world)
        elif rank == 0:
            labels = [c for c in check_classes(args.classes, model.num_classes) for _ in range(args.per_class)]
            write_grid(model, diffusion, args, labels, vae, out)
            print(f"wrote {out} ({len(labels)} samples, {args.sampler} {args.steps} steps, cfg {guidance(args)}, seed {args.seed})")
    if ddp:
        dist.destroy_process_group()

if __name__ == "__main__":
    exit_on_sigterm()
    args = parser.parse_args()
    try:
        main(args)
    except (KeyboardInterrupt, Terminated) as e:  # Ctrl-C or SIGTERM: no traceback; an FID set or a bank keeps its finished samples
        if (args.num_fid_samples or args.num_bank_samples) and int(os.environ.get("RANK", 0)) == 0:
            print("stopped: the finished samples are kept, and the same command goes on from them", flush=True)
        if isinstance(e, Terminated):
            raise
        exit_interrupted()
    except (ValueError, OSError) as e:  # bad input, or a folder that cannot be written: one line, exit code 2
        die(str(e))
    except RuntimeError as e:  # under torchrun: another rank failed, and said why
        if not peer_lost(e):
            raise
        die(f"rank {os.environ.get('RANK', 0)}: lost contact with another rank (its error, if any, is above)")
