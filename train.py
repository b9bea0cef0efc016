"""
Fine-tune a pretrained DiT on a new dataset with DiffFit (or one of the methods it is compared with), optionally
with Diff-Tuning.

DiffFit: Xie et al. 2023, arXiv:2304.06648. DiT: Peebles & Xie 2022, arXiv:2212.09748.

    torchrun --nproc_per_node=8 train.py --data food101           # the paper's setting (8 GPUs)
    python train.py --data food101 --global-batch-size 32         # one GPU
    python train.py                                               # the toy default: CPU, a few minutes
    python train.py --method lora-r8                              # any method of difffit.py, on the toy

The same script runs under `python` and `torchrun` (DDP is detected from the RANK variable).
"""
import argparse
import contextlib
import csv
import fcntl
import functools
import glob
import itertools
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import difffit
import fid
import prepare
import toy
from diffusion import create_diffusion
from files import (Terminated, atomic_write, check_flags, exit_interrupted, exit_on_sigterm, launched_by_torchrun, load_arrays, load_file,
                   peer_lost, published, unwritable)
from models import VAE_SCALE, DiT_models, bf16_chosen, load_model, load_vae, precision_note, raw_config, save_model
from prepare import DATASETS
from sample import LOOPS, generate, make_diffusion, save_grid, to_images

# Defaults that depend on the data: the paper's (§4.2; the EMA decay is DiT's) for real datasets, a few CPU minutes for the toy.
PAPER = dict(max_steps=24_000, global_batch_size=256, ema_decay=0.9999, image_size=256)
TOY = dict(max_steps=800, global_batch_size=32, ema_decay=0.99)  # the image size is the domain's (toy.DOMAINS)

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="DiffFit fine-tuning of a pretrained DiT (python or torchrun).")
# data
parser.add_argument("--data", default="toy", help=f"dataset ({', '.join(DATASETS)}) or an image folder <class>/<image> (default: %(default)s)")
parser.add_argument("--data-dir", default="data", help="where datasets and their latent caches live (prepare.py) (default: %(default)s)")
parser.add_argument("--image-size", type=int, default=None, help="resolution, a multiple of 8 (default: 256; 512 in §4.3; a toy domain: its own)")
parser.add_argument("--no-cache", action="store_true", help="encode images with the VAE every step instead of reading the latent cache")
parser.add_argument("--vae", default="ema", help="SD VAE: ema or mse (the encoders are the same), or a local file (default: %(default)s)")
parser.add_argument("--num-workers", type=int, default=4, help="image-decoding processes per rank (the cache's encode, --no-cache) (default: %(default)s)")
# model
parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models),
                    help="DiT config of a raw published checkpoint (ours carry their own) (default: %(default)s)")
parser.add_argument("--ckpt", default=None, help="base (default: DiT-XL-2-256x256.pt, downloaded; the toy: assets/toy_base.safetensors; "
                                                  "toy-source: scratch); 'scratch' = random init")
parser.add_argument("--no-pos-trick", action="store_true", help="from a lower-resolution base: the plain sin-cos table, not the interpolated one (§4.3)")
# difffit
parser.add_argument("--method", default="difffit", choices=list(difffit.METHODS), help="which parameters train (default: %(default)s)")
parser.add_argument("--gamma-blocks", default=None, help="blocks that get γ, e.g. '0-13' (default: the first half, Table 4b)")
parser.add_argument("--no-gamma-qkv", action="store_true", help="no γ on the qkv projections (Table 4c)")
parser.add_argument("--no-gamma-final", action="store_true", help="no γ on the final layer (Table 4c)")
# diff-tuning (Zhong et al. 2024, arXiv:2406.00773; composes with any --method)
parser.add_argument("--diff-tuning", default=None, metavar="BANK", help="Diff-Tuning with this bank of base samples (sample.py --num-bank-samples)")
parser.add_argument("--bank-fraction", type=float, default=0.2, help="share of each batch taken from the bank (Diff-Tuning: 0.2) (default: %(default)s)")
parser.add_argument("--bank-weight", type=float, default=0.1, help="weight of the bank's loss term (Diff-Tuning: 0.1) (default: %(default)s)")
parser.add_argument("--tau", type=float, default=1.0, help="downstream t ∝ (t+1)^τ, bank t ∝ (T-t)^τ (Diff-Tuning: 1; 0 = uniform) (default: %(default)s)")
# optimization
parser.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default: {PAPER['max_steps']}, the paper's; the toy: {TOY['max_steps']})")
parser.add_argument("--global-batch-size", type=int, default=None,
                    help=f"images per step over all ranks (default: {PAPER['global_batch_size']}; the toy: {TOY['global_batch_size']})")
parser.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step: the same batches in less memory; a resumed run may change it (default: %(default)s)")
parser.add_argument("--lr", type=float, default=None, help="default: 1e-4 for full fine-tuning and 10x that, 1e-3, for the others (Table 4d)")
parser.add_argument("--ema-decay", type=float, default=None, help=f"EMA decay of the trained tensors (default: {PAPER['ema_decay']}; toy: {TOY['ema_decay']})")
parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="bf16 autocast where the hardware has it (auto), always (bf16) or never (fp32) (default: %(default)s)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--seed", type=int, default=0, help="global seed (default: %(default)s)")
# logging/checkpointing
parser.add_argument("--results-dir", default="results", help="runs go to results/NNN-<data>-<method> (default: %(default)s)")
parser.add_argument("--resume", default=None, help="a run folder, or 'latest', to continue from its checkpoint (exactly with its ranks x --grad-accum)")
parser.add_argument("--log-every", type=int, default=50, help="steps between log lines (default: %(default)s)")
parser.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints (default: %(default)s)")
parser.add_argument("--sample-every", type=int, default=0, help="steps between EMA sample grids (0: at the end only) (default: %(default)s)")
parser.add_argument("--sampler", default="sde-dpm++", choices=list(LOOPS),
                    help="sampler of the grids and the toy measure (as sample.py) (default: %(default)s)")
parser.add_argument("--sample-steps", type=int, default=20,
                    help="network calls per sample of the grids and the toy measure (as sample.py --steps) (default: %(default)s)")
parser.add_argument("--cfg-scale", type=float, default=4.0,
                    help="guidance scale of the sample grids and the toy measure (paper: 4.0 for pictures) (default: %(default)s)")
parser.add_argument("--eval-per-class", type=int, default=32,
                    help="toy data only: samples per class for the toy measure at start and end (0: off) (default: %(default)s)")
parser.add_argument("--eval-every", type=int, default=0,
                    help="toy data only: steps between toy measures of the EMA, a curve in toy_curve.csv (0: off) (default: %(default)s)")

# -----------------------------------------------------------------------------
# helpers

def print0(*a):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, flush=True)

def die(msg):
    """Bad input or a failed run: one `error:` line and exit code 2, as in every script here."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)

parser.error = lambda msg: die(f"{msg} (see --help)")  # argparse's own complaints as one line too, without the usage block

def parse_given(argv=None):
    """(args, the flags typed on the command line): argparse leaves alone an attribute it finds in the namespace, so
    what is still `unset` after parsing was not typed. A resumed run refuses typed flags that disagree with its own."""
    defaults, unset = vars(parser.parse_args([])), object()
    args = vars(parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(defaults, unset))))
    return argparse.Namespace(**{k: defaults[k] if v is unset else v for k, v in args.items()}), {k for k, v in args.items() if v is not unset}

def git_info():
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, cwd=difffit.ROOT).stdout.strip()
    try:
        return f"{run('git', 'rev-parse', '--short', 'HEAD') or 'no commit'}{' + uncommitted changes' if run('git', 'status', '--porcelain', '-uno') else ''}"
    except OSError:
        return "unknown"

def parse_blocks(text):
    """--gamma-blocks '0-13' or '5' -> [0, ..., 13] or [5]; None stays None (difffit's default, the first half)."""
    if text is None:
        return None
    a, _, b = text.partition("-")
    if not (a.isdigit() and (b or a).isdigit()):
        raise ValueError(f"--gamma-blocks {text}: expected a block range like 0-13 or one block like 5")
    if int(b or a) < int(a):
        raise ValueError(f"--gamma-blocks {text}: an empty range: put the first block first ({b}-{a})")
    return list(range(int(a), int(b or a) + 1))

def check_args(args, world=1, first=False):
    """Every flag, before anything is loaded, downloaded or created; main runs it on the flags as given (first), then on
    the settings that a resumed run or the dataset's defaults fill in. Raises ValueError('--flag value: why; what to do')."""
    is_toy = DATASETS.get(args.data, {}).get("toy", False)
    unknown = first and args.resume is not None  # a resumed run's data is its own, not --data's default: its checks wait
    finite = lambda v: v is None or math.isfinite(v)
    given = lambda k: getattr(args, k) != parser.get_default(k)
    gbs, accum = args.global_batch_size, max(args.grad_accum, 1)
    batch = gbs // (world * accum) if gbs else None  # per rank and micro-step
    new_run = args.resume in (None, "latest")  # a new folder goes into --results-dir; a resumed run writes in its own
    out = unwritable(args.results_dir if new_run else args.resume)
    parse_blocks(args.gamma_blocks)
    if args.data not in DATASETS and os.path.isdir(args.data) and not args.no_cache:
        prepare.dataset_dir(args.data, args.data_dir)  # raises for a --data-dir inside the folder, where the cache would go
    patch = int(args.model.split("/")[1])  # DiT-S/8 -> 8: what --ckpt scratch builds
    only_difffit = "only --method difffit has γ: drop the flag, or use --method difffit"
    only_dt = "only Diff-Tuning uses it: add --diff-tuning BANK, or drop the flag"
    check_flags(args, [
        # data and model
        ("--data", args.data in DATASETS or os.path.isdir(args.data), f"not a dataset ({', '.join(DATASETS)}) nor an image folder <class>/<image>"),
        ("--image-size", args.image_size is None or unknown or not is_toy or args.image_size == DATASETS[args.data]["size"],
         f"the toy domain {args.data} is {DATASETS.get(args.data, {}).get('size')} pixels square: drop --image-size"),
        ("--image-size", args.image_size is None or is_toy or (8 <= args.image_size <= 2048 and args.image_size % 8 == 0),
         "the VAE needs a multiple of 8, at most 2048 (the paper: 256, or 512 in §4.3)"),
        ("--image-size", args.image_size is None or args.ckpt != "scratch" or is_toy or args.image_size // 8 % patch == 0,
         f"{args.model}'s patches are {patch} latent pixels wide: use a multiple of {8 * patch}"),
        ("--no-cache", unknown or not (is_toy and args.no_cache), "the toy data is made in memory and has no cache: drop --no-cache"),
        ("--vae", unknown or not (is_toy and given("vae")), "the toy data is pixels, no VAE encodes it: drop --vae"),
        ("--vae", unknown or is_toy or args.vae in ("ema", "mse") or os.path.exists(args.vae), "no such file: use ema, mse or the path of an SD VAE file"),
        ("--num-workers", args.num_workers >= 0, "use 0 (decode in the training process) or more"),
        ("--ckpt", args.ckpt in (None, "scratch") or published(args.ckpt) or os.path.exists(args.ckpt),
         "no such file: pass a base checkpoint, a published name (DiT-XL-2-256x256.pt) or 'scratch'"),
        ("--ckpt", args.ckpt != "scratch" or args.method == "full",  # its delta could not rebuild the frozen random weights
         f"a random init has no weights worth keeping frozen: train it with --method full, or fine-tune a base with {args.method}"),
        # difffit and Diff-Tuning
        ("--gamma-blocks", args.gamma_blocks is None or args.method == "difffit", only_difffit),
        ("--no-gamma-qkv", not args.no_gamma_qkv or args.method == "difffit", only_difffit),
        ("--no-gamma-final", not args.no_gamma_final or args.method == "difffit", only_difffit),
        ("--diff-tuning", args.diff_tuning is None or os.path.isfile(args.diff_tuning),
         "no such bank: write one from the base with sample.py --num-bank-samples"),
        ("--bank-fraction", 0 <= args.bank_fraction < 1, "a share of each batch, in [0, 1) (Diff-Tuning: 0.2)"),
        ("--bank-fraction", args.diff_tuning or not given("bank_fraction"), only_dt),
        ("--bank-fraction", not args.diff_tuning or not batch or args.bank_fraction == 0 or int(args.bank_fraction * batch) > 0,
         f"of a per-rank batch of {batch} gives 0 bank samples: use a larger fraction or --global-batch-size"),
        ("--bank-weight", finite(args.bank_weight) and args.bank_weight >= 0, "a finite weight >= 0 (Diff-Tuning: 0.1)"),
        ("--bank-weight", args.diff_tuning or not given("bank_weight"), only_dt),
        ("--tau", finite(args.tau) and args.tau >= 0, "a finite exponent >= 0 (Diff-Tuning: 1; 0: uniform t)"),
        ("--tau", args.diff_tuning or not given("tau"), only_dt),
        # optimization
        ("--max-steps", args.max_steps is None or args.max_steps >= 1, "train at least 1 step"),
        ("--global-batch-size", gbs is None or gbs >= 1, "use at least 1 image per step"),
        ("--grad-accum", args.grad_accum >= 1, "use at least 1 micro-batch per step"),
        ("--global-batch-size", not gbs or gbs % (world * accum) == 0,
         f"is not divisible by {world} ranks x --grad-accum {args.grad_accum}: " + (f"use a multiple of {world * accum}" if new_run else
         "resume this run on a number of ranks x --grad-accum that divides it")),
        ("--lr", args.lr is None or (finite(args.lr) and args.lr > 0), "use a positive, finite learning rate (default: 1e-3, full fine-tuning 1e-4)"),
        ("--ema-decay", args.ema_decay is None or 0 <= args.ema_decay < 1, "use a decay in [0, 1) (DiT: 0.9999; at 1 the EMA never leaves the base)"),
        ("--seed", 0 <= args.seed < 2**32, "use a seed in 0 .. 2^32 - 1"),
        # logging/checkpointing
        ("--results-dir", not new_run or out is None, f"{out}: pass a --results-dir you can write to"),
        ("--resume", new_run or os.path.isdir(args.resume), "not a run folder: pass results/NNN-<data>-<method> (the folder of its ckpt.pt) or 'latest'"),
        ("--resume", new_run or out is None, f"{out}: the run cannot write there"),
        ("--log-every", args.log_every >= 1, "log every N >= 1 steps"),
        ("--ckpt-every", args.ckpt_every >= 1, "checkpoint every N >= 1 steps"),
        ("--sample-every", args.sample_every >= 0, "use 0 (one grid at the end) or a number of steps"),
        ("--sample-steps", 2 <= args.sample_steps <= 1000, "the sample grids take 2 .. 1000 steps"),
        ("--cfg-scale", finite(args.cfg_scale) and args.cfg_scale >= 0, "use a finite guidance scale >= 0 (1: none; the grids of the paper: 4.0)"),
        ("--eval-per-class", args.eval_per_class >= 0, "use 0 (off) or the samples per class of the toy measure"),
        ("--eval-every", args.eval_every >= 0, "use 0 (off) or the steps between toy measures"),
        ("--eval-every", not args.eval_every or is_toy, f"the toy measure needs a toy domain ({', '.join(toy.DOMAINS)}): drop the flag"),
        ("--eval-every", not args.eval_every or args.eval_per_class, "the curve measures --eval-per-class samples per class: give it more than 0"),
    ])

def runs(results_dir):
    """(number, folder) of the runs NNN-<name> in results_dir, by number."""
    names = os.listdir(results_dir) if os.path.isdir(results_dir) else []
    return sorted((int(d.split("-")[0]), os.path.join(results_dir, d)) for d in names if "-" in d and d.split("-")[0].isdigit())

def split(ckpt):
    """(ranks, --grad-accum) that a checkpoint's run trained with."""
    return len(ckpt["rng"]), ckpt["args"].get("grad_accum", 1)

def resolve_args(args, world=1, given=None):
    """(args, dataset info, checkpoint or None): a resumed run takes its own arguments, the rest default by dataset.
    given: the flags typed (parse_given); without it, those that differ from their defaults."""
    ckpt = None
    if args.resume:
        run_dir = args.resume
        if run_dir == "latest":  # the newest run that can be resumed; one killed before its first checkpoint cannot
            done = [d for _, d in runs(args.results_dir) if os.path.exists(os.path.join(d, "ckpt.pt"))]
            if not done:
                raise FileNotFoundError(f"--resume latest: no run in {args.results_dir} has a checkpoint (ckpt.pt) to resume from")
            run_dir = done[-1]
        path = os.path.join(run_dir, "ckpt.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume {run_dir}: no ckpt.pt there (runs write one every --ckpt-every steps)")
        if int(os.environ.get("RANK", 0)) == 0 and os.path.exists(os.path.join(run_dir, "log.txt")):  # a run another job trains
            locked_log(run_dir, warn=False).close()  # fails now, before its checkpoint (GBs for full) is read; open_run locks for good
        ckpt = load_file(path, "checkpoint")
        if not (isinstance(ckpt, dict) and {"delta", "ema", "opt", "step", "rng", "args"} <= ckpt.keys()):
            raise ValueError(f"checkpoint {path}: not a checkpoint of train.py (it lacks the delta, optimizer, step and args)")
        # the run continues with its own arguments, over today's defaults (a flag added since the checkpoint keeps its
        # default): a flag given now must agree with them, except the ones a resumed run may change
        defaults = vars(parser.parse_args([]))
        own = {**defaults, **ckpt["args"]}
        fixed = [k for k in defaults if k not in ("resume", "results_dir", "max_steps", "ckpt", "grad_accum")]
        given = given if given is not None else {k for k in defaults if getattr(args, k) != defaults[k]}
        check_flags(args, [(f"--{k.replace('_', '-')}", k not in given or getattr(args, k) == own[k],
                            f"--resume continues the run with its own setting ({own[k]}): drop the flag, or start a new run") for k in fixed])
        check_flags(args, [("--max-steps", args.max_steps is None or args.max_steps >= ckpt["step"],
                            f"the run is at step {ckpt['step']} already: pass more steps")])
        # its base: where --ckpt says it is now, or where the delta says (not the path as typed, which was relative to another folder)
        base = args.ckpt or difffit.base_path(ckpt["delta"]["base"])
        args = argparse.Namespace(**{**own, "resume": run_dir, "max_steps": args.max_steps or own["max_steps"], "ckpt": base,
                                     "grad_accum": args.grad_accum if "grad_accum" in given else own["grad_accum"]})
        if args.diff_tuning and split(ckpt) != (world, args.grad_accum):  # its bank's share of a step is rounded per micro-batch
            raise ValueError(f"--resume {run_dir}: a Diff-Tuning run resumes only on the split it trained with, {'{} x {}'.format(*split(ckpt))} "
                             f"(ranks x --grad-accum), since its bank's share of each step is rounded per micro-batch")
        if base != "scratch" and not published(base) and not os.path.exists(base):
            raise FileNotFoundError(f"--resume {run_dir}: its base {base} is missing: pass --ckpt with where it is now")
    is_toy = DATASETS.get(args.data, {}).get("toy", False)
    for k, v in (dict(TOY, image_size=DATASETS[args.data]["size"]) if is_toy else PAPER).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = 1e-4 if args.method == "full" else 1e-3  # Table 4d: PEFT is best at 10x DiT's 1e-4
    # the toy's base is shipped; the toy's ImageNet is what it was pretrained on (from scratch)
    args.ckpt = args.ckpt or (("scratch" if args.data == "toy-source" else toy.BASE_PATH) if is_toy else "DiT-XL-2-256x256.pt")
    check_args(args, world)  # again, on what the run will really use
    info = DATASETS.get(args.data)
    if info is None:  # an image folder: its classes are its sub-folders, and a resumed run must find the same ones
        names = prepare.sub_folders(prepare.image_folder(args.data, "train"))
        info = dict(classes=len(names), names=names)
        if ckpt is not None and ckpt.get("classes", names) != names:  # a new folder would train as another class's label
            new, gone = [c for c in names if c not in ckpt["classes"]], [c for c in ckpt["classes"] if c not in names]
            raise ValueError(f"--resume {args.resume}: the classes of {args.data} changed since the run began ({len(new)} new: "
                             f"{', '.join(new[:3]) or '-'}; {len(gone)} gone: {', '.join(gone[:3]) or '-'}): restore them, or start a new run")
    return args, info, ckpt

def create_model(args, info, ckpt):
    """(model, config, spec): the base loaded strictly with the method's surgery done, or a resumed run's model."""
    if ckpt is not None:
        model, delta = difffit.load(ckpt["delta"], base=args.ckpt)  # its base where it is now (resolve_args)
        return model, delta["config"], delta["spec"]
    if info.get("toy"):  # pixel space; the toy base's architecture (used for --ckpt scratch, the base's pretraining)
        config = dict(toy.BASE_CONFIG, input_size=args.image_size, num_classes=info["classes"])
    else:  # latent space; used for 'scratch' (with the data's classes) and for raw published checkpoints, which carry no config
        config = dict(raw_config(args.model, args.image_size), **({"num_classes": info["classes"]} if args.ckpt == "scratch" else {}))
    model, config, base_grid = load_model(args.ckpt, config, input_size=config["input_size"])
    if model.in_channels != (3 if info.get("toy") else 4):  # found now, not after a latent cache was encoded for it
        raise ValueError(f"--ckpt {args.ckpt}: a DiT of {model.in_channels}-channel inputs, but --data {args.data} is " +
                         ("pixels (3 channels): use a toy base" if info.get("toy") else "VAE latents (4 channels): use a latent DiT, "
                          "such as DiT-XL-2-256x256.pt"))
    if info.get("base_labels") and model.num_classes != info["classes"]:  # the data's labels index the base's own table
        raise ValueError(f"--ckpt {args.ckpt}: a DiT of {model.num_classes} classes, but --data {args.data} keeps the base's label table "
                         f"and has {info['classes']}: use a base pretrained on its classes")
    gamma_blocks = parse_blocks(args.gamma_blocks)
    if gamma_blocks and gamma_blocks[-1] >= model.depth:
        raise ValueError(f"--gamma-blocks {args.gamma_blocks}: this DiT has blocks 0-{model.depth - 1}")
    new_labels = args.ckpt != "scratch" and not info.get("base_labels")  # fresh class rows (difffit.py)
    base_grid = base_grid if args.ckpt != "scratch" and not args.no_pos_trick else None  # the §4.3 trick from a smaller grid
    spec = difffit.make_spec(model, args.method, info["classes"], gamma_blocks, not args.no_gamma_qkv, not args.no_gamma_final,
                             new_labels, base_grid)
    if args.ckpt == "scratch":
        spec["fingerprint"] = None  # a random init has no weights to check a delta against
    difffit.apply(model, spec)
    return model, config, spec

@functools.lru_cache(maxsize=4)  # the data's and the bank's current epochs (and the next, where a batch spans two)
def epoch_order(n, seed, epoch):
    """The permutation of n items for one epoch: drawn once per epoch, not at every micro-step (ImageNet: ~50 ms each)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

def batch_indices(i, n, batch, rank, world, seed):
    """Dataset indices of one rank's share of global micro-batch i. Each epoch is a seeded permutation, so
    any batch is a pure function of (seed, i): a resumed run sees exactly the batches it would have seen."""
    pos = (i * world + rank) * batch + torch.arange(batch)  # positions in the endless stream of epochs
    out = torch.empty_like(pos)
    for epoch in (pos // n).unique().tolist():
        perm = epoch_order(n, seed, epoch)
        m = pos // n == epoch
        out[m] = perm[pos[m] % n]
    return out

def to_unit(x):
    """uint8 images (B, 3, H, W) -> floats in [-1, 1], each flipped left-right with probability 1/2 (DiT's augmentation)."""
    x = x.float().div(127.5).sub(1)
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)

def batches(args, info, n, start, vae, bf16, rank, world, device):
    """(x, y) of every micro-step from `start` on, n images per rank: pixels in [-1, 1] (the toy) or scaled VAE latents."""
    if info.get("toy"):  # in memory
        images, labels = toy.load(args.data)
        images = images.permute(0, 3, 1, 2)  # uint8 (N, 3, S, S)
        for i in itertools.count(start):
            idx = batch_indices(i, len(images), n, rank, world, args.seed)
            yield to_unit(images[idx].to(device)), labels[idx].to(device)
    elif not args.no_cache:  # the cache of both flips' VAE posteriors: a fresh flip and posterior sample each time
        cache = prepare.open_cache(args.data, args.data_dir, "train", args.image_size, args.vae)
        labels = torch.from_numpy(cache["labels"])
        for i in itertools.count(start):
            idx = batch_indices(i, len(labels), n, rank, world, args.seed)
            yield prepare.sample_latents(cache, idx).to(device), labels[idx].to(device)
    else:  # encode every step, as DiT's train.py does (slower: the VAE costs more than a DiffFit step)
        ds = prepare.open_dataset(args.data, args.data_dir, "train", args.image_size)
        order = (batch_indices(i, len(ds), n, rank, world, args.seed).tolist() for i in itertools.count(start))
        loader = torch.utils.data.DataLoader(ds, batch_sampler=order, num_workers=args.num_workers, collate_fn=prepare.collate,
                                             pin_memory=device.type == "cuda")
        empty = 0  # batches in a row whose every image was unreadable
        for x, y in loader:  # uint8 (B, 3, S, S); unreadable images were dropped (and reported) by collate
            if not len(x):  # take the next batch (from then on, a resumed run draws one batch later than this run did)
                empty += 1
                if empty > len(ds) // (n * world) + 1:  # a whole epoch of nothing
                    raise ValueError(f"--data {args.data}: none of its {len(ds)} images could be read (each is named above)")
                continue
            empty = 0
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                mean, std = vae.encode(to_unit(x.to(device)))
            yield (mean + std * torch.randn_like(std)) * VAE_SCALE, y.to(device)

def claim_run_dir(results_dir, name):
    """results_dir/NNN-name, NNN one past the highest number there. os.mkdir either creates the folder or fails, so two
    runs started at once never share one, and gaps in the numbers (deleted runs) are no problem."""
    os.makedirs(results_dir, exist_ok=True)
    while True:
        run_dir = os.path.join(results_dir, f"{max((n for n, _ in runs(results_dir)), default=-1) + 1:03d}-{name}")
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:  # another run took that number first
            continue

def locked_log(run_dir, warn=True):
    """run_dir/log.txt open for appending and locked: released when it closes (close_run, or the process ends)."""
    log = open(os.path.join(run_dir, "log.txt"), "a")
    try:
        fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.close()
        raise ValueError(f"--resume {run_dir}: another process is training this run now: wait for it to stop, or resume another run") from None
    except OSError as e:  # a file system without locks (NFS without lockd, Lustre with noflock): train unguarded
        if warn:
            print0(f"warning: cannot lock {log.name} ({e.strerror}); nothing stops a second job from resuming this run at once")
    return log

def open_run(args, ckpt):
    """(run folder, log.txt, metrics.csv), the files open for appending; a new CSV gets its header. The log stays locked
    while the run trains, so a second job cannot resume the same run at once. A resumed run's logs are cut back to what
    they held at its checkpoint, so the steps after it (redone now) are not logged twice, and a crash's temp files go."""
    if ckpt is None:
        name = f"{os.path.basename(os.path.abspath(args.data))}-{args.method}" + ("-difftuning" if args.diff_tuning else "")
        run_dir = claim_run_dir(args.results_dir, name)
    else:
        run_dir = args.resume
    log = locked_log(run_dir)
    if ckpt is not None:
        for f in glob.glob(os.path.join(run_dir, "*.tmp")):
            os.remove(f)
        for name, size in ckpt.get("logs", {}).items():
            path = os.path.join(run_dir, name)
            if os.path.exists(path) and os.path.getsize(path) > size:  # (never longer: truncate would pad a shorter file)
                os.truncate(path, size)
    metrics_file = open(os.path.join(run_dir, "metrics.csv"), "a", newline="")
    if ckpt is None:
        csv.writer(metrics_file).writerow(["step", "loss", "lr", "img_per_s"])
        metrics_file.flush()
    return run_dir, log, metrics_file

def close_run(run_dir, log, metrics_file):
    """Close the logs. A folder without a checkpoint holds nothing to resume, so a run that fails before its first one
    leaves no folder behind."""
    log.close()
    metrics_file.close()
    if not os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)

def left(run_dir, saved):
    """What a failed run leaves behind (close_run): its last checkpoint, or nothing."""
    if saved is None:
        return "no checkpoint had been written, so the run folder is removed"
    return f"the previous checkpoint {os.path.join(run_dir, 'ckpt.pt')} (step {saved}) is intact"

def rng_states(ddp, world, trained, step, device):
    """Every rank's RNG states (for exact resume); under DDP also a cheap check that the replicas are still identical."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.zeros(0)}
    if not ddp:
        return [rng]
    rngs = [None] * world
    dist.all_gather_object(rngs, rng)
    sums = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(sums, sum(p.detach().double().sum() for p in trained.values()).reshape(1))
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"DDP replicas diverged at step {step}: {[s.item() for s in sums]}")
    return rngs

def save_checkpoint(path, delta, ema, opt, step, rngs, args, logs, classes=None):
    """ckpt.pt: the run's delta (current tensors), their EMA, the optimizer, the step, every rank's RNG, the args
    (a dict), the sizes of the log files and an image folder's class names: plain tensors and containers, so it loads
    with weights_only=True."""
    ckpt = dict(delta=delta, ema={k: v.cpu() for k, v in ema.items()}, opt=opt.state_dict(), step=step, rng=rngs, args=vars(args),
                logs={os.path.basename(f.name): f.tell() for f in logs}, classes=classes)
    atomic_write(path, lambda f: torch.save(ckpt, f))

def finished(run_dir, ckpt):
    """Did the run write all its results after its last checkpoint? Its log then ends so, past the size the checkpoint kept."""
    path = os.path.join(run_dir, "log.txt")
    if not os.path.exists(path):  # a lost log: not known, so the results are written again
        return False
    with open(path, "rb") as f:
        f.seek(ckpt.get("logs", {}).get("log.txt", 0))
        return f"finished at step {ckpt['step']}: every result written".encode() in f.read()

def restore(ckpt, opt, rank, world, seed, device):
    """A resumed run's (EMA, step); loads its optimizer state and this rank's RNG streams (on another number of ranks,
    new streams seeded by the step, so that the resumed run is reproducible too)."""
    opt.load_state_dict(ckpt["opt"])
    if len(ckpt["rng"]) != world:
        torch.manual_seed((seed * 1_000_003 + ckpt["step"]) * world + rank)
    else:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and len(ckpt["rng"][rank]["cuda"]):  # a run begun on a CPU has no CUDA stream: it stays seeded
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    return {k: v.to(device) for k, v in ckpt["ema"].items()}, ckpt["step"]

@contextlib.contextmanager
def swapped_in(model, params):
    """Temporarily load `params` (e.g. the EMA) into the model's trained parameters."""
    backup = {k: v.detach().clone() for k, v in model.named_parameters() if k in params}
    difffit.copy_params(model, params)
    try:
        yield model
    finally:
        difffit.copy_params(model, backup)

def export(model, ema, spec, config, args, run_dir):
    """The run's results: the delta of the EMA tensors and, where the model's method merges, the plain DiT; says what it wrote."""
    delta = difffit.make_delta(ema, spec, config, difffit.base_ref(args.ckpt))
    difffit.save_delta(os.path.join(run_dir, "delta.safetensors"), delta)
    wrote = f"{run_dir}/delta.safetensors ({os.path.getsize(os.path.join(run_dir, 'delta.safetensors')) / 1e6:.2f} MB)"
    if difffit.mergeable(model):  # adapters and prompts are modules a plain DiT lacks: delta only
        merged, _ = difffit.load(delta)  # base + delta in fp32, from the files, as sample.py loads them
        save_model(os.path.join(run_dir, "model.safetensors"), difffit.merge(merged), {**config, "num_classes": spec["num_classes"]})
        wrote += f" and {run_dir}/model.safetensors (merged)"
    return wrote

def ema_images(model, ema, args, labels, vae, bf16):
    """uint8 images of `labels` drawn with `ema` swapped in and the run's sampler, steps and guidance scale."""
    model.eval()
    with swapped_in(model, ema), torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
        x = generate(model, make_diffusion(args.sampler, str(args.sample_steps)), labels, args.cfg_scale, sampler=args.sampler)
        images = to_images(x, vae)
    model.train()
    return images

def save_samples(model, ema, args, num_classes, vae, bf16, path):
    """A grid of 16 EMA samples (the classes in turn), with the run's sampling settings."""
    save_grid(ema_images(model, ema, args, [i % num_classes for i in range(16)], vae, bf16), path)

# -----------------------------------------------------------------------------
# Diff-Tuning (Zhong et al. 2024, arXiv:2406.00773), which composes with any method: part of each batch comes from
# a knowledge bank of the base's own samples, trained with the null label. A fork without it deletes this block
# and the lines marked "Diff-Tuning" in main.

def sample_timesteps(n, T, tau, towards="noise", device="cpu"):
    """Diff-Tuning draws t, it does not weight the loss: P(t) ∝ (t + 1)^τ for downstream data (towards the noise
    end, where the model must re-learn the domain), ∝ (T − t)^τ for the knowledge bank (towards the data end, where
    the base's knowledge still holds). τ = 0 is plain training's uniform draw, with the same random numbers."""
    if tau == 0:
        return torch.randint(0, T, (n,), device=device)
    w = (torch.arange(1, T + 1, dtype=torch.float64, device=device) / T) ** tau  # ∝ (t + 1)^τ for t = 0 .. T-1, at most 1 for any τ
    return torch.multinomial(w if towards == "noise" else w.flip(0), n, replacement=True)

def open_bank(path, model):
    """The bank as a read-only memory map (read a batch at a time), checked: float32 samples (N, C, H, W) of this model."""
    bank = load_arrays(path, "--diff-tuning bank", mmap=True)
    want = (model.in_channels, model.input_size, model.input_size)
    if not isinstance(bank, np.ndarray) or bank.dtype != np.float32 or bank.shape[1:] != want or not len(bank):
        what = f"{bank.dtype} {bank.shape}" if isinstance(bank, np.ndarray) else "an .npz archive"
        raise ValueError(f"--diff-tuning {path}: holds {what}, not float32 samples (N, {', '.join(map(str, want))}) of this model: "
                         "write the bank from this base with sample.py --num-bank-samples")
    if not np.isfinite(bank).all():  # else the first bank batch turns the loss into NaN, and the run blames --lr
        raise ValueError(f"--diff-tuning {path}: holds NaN or inf samples: write the bank again with sample.py --num-bank-samples")
    return bank

def bank_batches(bank, n, start, rank, world, seed, device):
    """n bank samples per rank and micro-step from `start` on: its own seeded stream of epochs; no flips, the samples
    are the base's own distribution."""
    print0(f"Diff-Tuning: {n} samples per rank and micro-step from the bank ({len(bank):,} samples)")
    for i in itertools.count(start):
        idx = batch_indices(i, len(bank), n, rank, world, seed + 1)
        yield torch.from_numpy(bank[idx.numpy()]).to(device)

# -----------------------------------------------------------------------------
# the toy measure: the CPU stand-in for FID on the toy world (toy.py), before and after training. A fork that trains
# on real data deletes this block and the lines marked "the toy" in main.

@functools.lru_cache(maxsize=8)
def toy_reference(domain, n):
    """The judge's statistics of half the real test split (the reference), and the floor: the Fréchet distance of n
    real test images of the other half to it, the same estimate a sample set of n images gets."""
    images, labels = toy.load(domain, "test")  # classes interleaved: 0, 1, ..., K-1, 0, 1, ...
    feats, logits = toy.judge_features(images)
    half = (np.arange(len(labels)) // toy.DOMAINS[domain]["classes"]) % 2 == 0  # every other round of K: both halves hold every class
    ref = fid.statistics(feats[~half])
    return ref, fid.frechet_distance(*fid.statistics(feats[half][:n]), *ref), toy.accuracy(logits, labels, domain)

def toy_measure(images, labels, domain):
    """How well samples (uint8 (N, H, W, 3)) of `labels` draw a toy domain, under the judge (always fp32): the Fréchet
    distance of their judge features to the real test split, its floor for N images, and the judge's accuracy on them."""
    ref, floor, real_acc = toy_reference(domain, len(images))
    feats, logits = toy.judge_features(images)
    return dict(frechet_distance=fid.frechet_distance(*fid.statistics(feats), *ref), floor=floor,
                accuracy=toy.accuracy(logits, labels, domain), real_accuracy=real_acc, n=len(images))

def toy_eval(model, params, args, bf16, what, run_dir, step, log0):
    """Sample eval_per_class images of every class from the model with `params` (the EMA) swapped in, measure them,
    log the result and write run_dir/toy_<what>.json and .npz (what: base, ema), or a row of toy_curve.csv (curve)."""
    labels = list(range(model.num_classes)) * args.eval_per_class
    print0(f"toy measure, {what} at step {step}: drawing {len(labels)} samples ({args.sampler}, {args.sample_steps} calls each) ...")
    images = ema_images(model, params, args, labels, None, bf16)
    m = toy_measure(images, torch.tensor(labels), args.data)
    log0(f"toy measure, {what} at step {step}: Fréchet distance {m['frechet_distance']:.2f} (floor {m['floor']:.2f}, {m['n']} images) | "
         f"accuracy {m['accuracy']:.0%} (among the judge's {toy.JUDGE_CLASSES} classes; real test images {m['real_accuracy']:.0%}) | judge: toy.py")
    if what == "curve":  # --eval-every: one row per measure (a resumed run may redo a step: readers keep the last row of each)
        with open(os.path.join(run_dir, "toy_curve.csv"), "a") as f:
            f.write(("step,frechet_distance,floor,accuracy,n\n" if f.tell() == 0 else "") +
                    f"{step},{m['frechet_distance']:.4f},{m['floor']:.4f},{m['accuracy']:.4f},{m['n']}\n")
        return m
    # the samples as a sample set (arr_0, which fid.py reads; class i mod K) and their labels
    atomic_write(os.path.join(run_dir, f"toy_{what}.npz"), lambda f: np.savez(f, arr_0=images, labels=np.array(labels)))
    if what == "ema" and os.path.exists(os.path.join(run_dir, "toy_base.npz")):  # per class: real | base | trained, 4x
        read = lambda f: (f["arr_0" if "arr_0" in f.files else "samples"], f["labels"])  # "samples": runs made before fid.py read them
        base = load_arrays(os.path.join(run_dir, "toy_base.npz"), "the base's samples", read)
        picture = toy.compare(args.data, [base, (images, labels)])
        atomic_write(os.path.join(run_dir, "toy_compare.png"), lambda f: picture.save(f, format="PNG"))
    atomic_write(os.path.join(run_dir, f"toy_{what}.json"), lambda f: f.write(json.dumps(dict(m, step=step)).encode()))
    return m

# -----------------------------------------------------------------------------

def main(args, given=None):
    # Settings first, so bad input fails before a download, a run folder or a step: every flag checked, a resumed run's
    # own settings or these with defaults by dataset (checked again); the batch per rank and micro-step.
    ddp = launched_by_torchrun()  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain python is one process
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    check_args(args, world, first=True)
    args, info, ckpt = resolve_args(args, world, given)
    is_toy = info.get("toy", False)
    if ckpt is not None and ckpt["step"] >= args.max_steps and finished(args.resume, ckpt):
        print0(f"{args.resume} finished at step {ckpt['step']} and wrote its results: nothing to do (a larger --max-steps trains on)")
        return args.resume
    if ckpt is not None and split(ckpt) != (world, args.grad_accum):  # batch_indices: step s reads images s·B ... (s+1)·B - 1, however split
        print0(f"warning: --resume {args.resume}: trained as {'{} x {}'.format(*split(ckpt))} (ranks x --grad-accum), now {world} x "
               f"{args.grad_accum}: the same batches, but random draws (noise, timesteps, flips, label dropout) differ from those of an "
               f"exact resume, which takes the same split")
    batch = args.global_batch_size // (world * args.grad_accum)
    n_bank = int(args.bank_fraction * batch) if args.diff_tuning else 0  # per rank and micro-step: 0.2 x 32 -> 6 bank + 26 data

    # Setup DDP.
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if ddp else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+: 0.51 -> 0.81 it/s for DiT (DiT #22)
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed * world + rank)
    bf16 = bf16_chosen(args.precision, device)

    # Create model: the base (strict load), then the surgery of the method on it; a resumed run rebuilds it from its delta.
    if not is_toy:  # but first the dataset, so a missing one fails in seconds, not after downloading the model and the VAE
        prepare.open_dataset(args.data, args.data_dir, "train", args.image_size)
    model, config, spec = create_model(args, info, ckpt)
    model.to(device)
    if bf16:  # the frozen weights never change: store them in bf16 once instead of recasting them every step
        difffit.store_frozen(model, torch.bfloat16)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema = {n: p.detach().clone() for n, p in trained.items()}  # EMA of the trained parameters only
    opt = torch.optim.AdamW(trained.values(), lr=args.lr, weight_decay=0, fused=device.type == "cuda")  # DiT: AdamW, wd 0
    diffusion = create_diffusion("")  # training sees all 1000 steps
    step = 0
    if ckpt is not None:  # resume: EMA, optimizer, step and this rank's RNG streams (the trained tensors came with the delta)
        ema, step = restore(ckpt, opt, rank, world, args.seed, device)
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # Setup data: any micro-step's batch is a pure function of (seed, i) (batch_indices), so resume is exact.
    vae = None if is_toy else load_vae(args.vae).to(device).eval()  # latents; also decodes the sample grids
    if not is_toy and not args.no_cache:  # the VAE posteriors of both flips, encoded once (all ranks share the work)
        prepare.encode_cache(args.data, args.data_dir, "train", args.image_size, vae, args.vae, rank=rank, world=world, device=device,
                             num_workers=args.num_workers, bf16=bf16)
    data = batches(args, info, batch - n_bank, step * args.grad_accum, vae, bf16, rank, world, device)
    if args.diff_tuning:  # Diff-Tuning: the knowledge bank
        bank = bank_batches(open_bank(args.diff_tuning, model), n_bank, step * args.grad_accum, rank, world, args.seed, device)

    # Run folder, log file, metrics CSV (rank 0; the other ranks learn the folder's name). From here on a failure leaves
    # the folder only if it holds a checkpoint to resume from (close_run).
    run_dir, log, metrics_file = open_run(args, ckpt) if rank == 0 else (None, None, None)
    if ddp:
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    saved = ckpt["step"] if ckpt else None  # the step of the checkpoint in run_dir
    handlers = None  # SIGINT's and SIGTERM's, set aside while a stopped run cleans up
    try:
        metrics = csv.writer(metrics_file) if rank == 0 else None
        def log0(msg):
            print0(msg)
            if log:
                log.write(msg + "\n")
                log.flush()
        n_trained = sum(p.numel() for p in trained.values())
        n_total = sum(p.numel() for n, p in model.named_parameters() if n != "pos_embed")
        log0(f"args: {json.dumps(vars(args))}")
        log0(f"git {git_info()} | torch {torch.__version__} | {world} x {device} | {precision_note(args.precision, device)}")
        log0(f"{args.method}: {n_trained:,} of {n_total:,} parameters train ({100 * n_trained / n_total:.3f}%) | {run_dir}")
        if "names" in info:  # sample.py --classes takes these numbers
            names = [c.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for c in info["names"]]  # folder names need not be UTF-8
            log0(f"classes: {', '.join(f'{i} {c}' for i, c in enumerate(names))}")
        measure = rank == 0 and is_toy and args.eval_per_class and args.ckpt != "scratch"  # the toy: the base is the ceiling
        if measure and step == 0:  # the model at step 0: the base itself, but for VPT's random prompts (and any γ not started at 1)
            toy_eval(model, {}, args, bf16, "base", run_dir, step, log0)

        # Train: one optimizer step = grad_accum micro-batches on every rank.
        model.train()  # enables label dropout, so the unconditional branch keeps training (CFG)
        curve = pathlib.Path(run_dir, "toy_curve.csv")  # a finished run extended: its last step joins the curve (once)
        measured = {int(row.split(",")[0]) for row in curve.read_text().splitlines()[1:]} if curve.exists() else set()
        if measure and args.eval_every and 0 < step < args.max_steps and step % args.eval_every == 0 and step not in measured:
            toy_eval(model, ema, args, bf16, "curve", run_dir, step, log0)
        running, t0, since = torch.zeros((), device=device), time.time(), step
        bar = tqdm(total=args.max_steps, initial=step, unit="step", disable=rank != 0 or not sys.stderr.isatty())  # terminals only
        while step < args.max_steps:
            for micro in range(args.grad_accum):
                x, y = next(data)
                n = len(x)  # batch - n_bank, or fewer if --no-cache dropped unreadable images
                if args.diff_tuning:  # Diff-Tuning: one batch [data; bank], data t towards the noise end, the bank's towards the data end
                    t = sample_timesteps(n, diffusion.num_timesteps, args.tau, "noise", device)
                    if n_bank:
                        x, y = torch.cat([x, next(bank)]), torch.cat([y, torch.full((n_bank,), model.num_classes, device=device)])
                        t = torch.cat([t, sample_timesteps(n_bank, diffusion.num_timesteps, args.tau, "data", device)])
                else:
                    t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)  # t uniform, as DiT
                last = micro == args.grad_accum - 1
                with (train_model.no_sync() if ddp and not last else contextlib.nullcontext()), \
                        torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    losses = diffusion.training_losses(train_model, x, t, dict(y=y))["loss"]  # (n + n_bank,)
                    loss = losses[:n].mean() + (args.bank_weight * losses[n:].mean() if n_bank else 0)  # Diff-Tuning: the bank's term
                (loss / args.grad_accum).backward()
                running += loss.detach() / args.grad_accum
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # ema += (1 - decay)(p - ema), one fused kernel for all tensors
                torch._foreach_lerp_([ema[k] for k in trained], [p.detach() for p in trained.values()], 1 - args.ema_decay)
            step += 1
            bar.update()

            # Once in a while: log (the loss all-reduced over ranks), check it is finite, checkpoint, sample.
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.max_steps:
                if ddp:
                    dist.all_reduce(running)
                loss_avg = running.item() / world / (step - since)
                if not math.isfinite(loss_avg):  # checked before any checkpoint, so the last one stays good
                    die(f"loss is {loss_avg} at step {step}; stopped without saving: {left(run_dir, saved)} (lower --lr or use --precision fp32)")
                dt = time.time() - t0
                lr = opt.param_groups[0]["lr"]
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
                ips = (step - since) * args.global_batch_size / dt
                log0(f"step {step:6d}/{args.max_steps} | loss {loss_avg:.4f} | lr {lr:.1e} | {(step - since) / dt:.2f} steps/s | {ips:.1f} img/s"
                     + (f" | {mem:.1f} GB" if mem else ""))
                if metrics:
                    metrics.writerow([step, f"{loss_avg:.6f}", lr, f"{ips:.2f}"])
                    metrics_file.flush()
                running.zero_()
                t0, since = time.time(), step
            t_aside = time.time()  # steps/s counts training only, not the curve or the grids
            if measure and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:  # the toy: a curve
                toy_eval(model, ema, args, bf16, "curve", run_dir, step, log0)  # before the checkpoint, whose log size includes it
            if args.sample_every and step % args.sample_every == 0 and rank == 0:
                save_samples(model, ema, args, info["classes"], vae, bf16, os.path.join(run_dir, f"samples-{step:07d}.png"))
            t0 += time.time() - t_aside
            if step % args.ckpt_every == 0 or step == args.max_steps:
                rngs = rng_states(ddp, world, trained, step, device)
                if rank == 0:
                    delta = difffit.make_delta(trained, spec, config, difffit.base_ref(args.ckpt))
                    save_checkpoint(os.path.join(run_dir, "ckpt.pt"), delta, ema, opt, step, rngs, args, (log, metrics_file), info.get("names"))
                saved = step
                if ddp:
                    dist.barrier()
                    log0(f"step {step}: {world} replicas in sync, checkpoint saved")
        bar.close()

        # The results (rank 0): the delta (EMA of the trained tensors), the merged plain DiT, a grid of EMA samples.
        if rank == 0:
            log0(f"wrote {export(model, ema, spec, config, args, run_dir)}")
            save_samples(model, ema, args, info["classes"], vae, bf16, os.path.join(run_dir, "samples.png"))
            if measure:  # the toy
                toy_eval(model, ema, args, bf16, "ema", run_dir, step, log0)
            log0(f"finished at step {step}: every result written")  # the last line: a resume of this run has nothing to do
    except OSError as e:  # a full disk, say: one line, not a traceback from inside torch.save (atomic_write kept the old file)
        die(f"could not write in {run_dir} ({e.strerror or e}); {left(run_dir, saved)}" + (f": --resume {run_dir} when there is room" if saved else ""))
    except (KeyboardInterrupt, Terminated):  # Ctrl-C, or SIGTERM from torchrun or a scheduler: say how to go on
        handlers = [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]  # a second one must not cut the cleanup
        print0(f"stopped at step {step}: {left(run_dir, saved)}" + (f"; --resume {run_dir} continues from it" if saved else ""))
        raise
    finally:  # also after a crash, Ctrl-C or a NaN
        if rank == 0:
            close_run(run_dir, log, metrics_file)
        if handlers:  # as they were: main may run again in this process (tests, study.py)
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
    if ddp:
        dist.destroy_process_group()
    return run_dir

if __name__ == "__main__":
    exit_on_sigterm()
    try:
        main(*parse_given())
    except KeyboardInterrupt:  # Ctrl-C: main said where the run stands, if it had begun; no traceback
        exit_interrupted()
    except (ValueError, OSError) as e:  # bad input, or a folder that cannot be written: one line, exit code 2
        die(str(e))
    except RuntimeError as e:  # under torchrun: another rank failed, and said why
        if not peer_lost(e):
            raise
        die(f"rank {os.environ.get('RANK', 0)}: lost contact with another rank (its error, if any, is above)")
