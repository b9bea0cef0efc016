"""
Bad input and failures, across train.py, sample.py, fid.py, prepare.py, bench.py and difffit.py: every kind of bad flag
or file gives exit code 2, one `error:` line and no files; a killed run resumes with logs as if nothing had happened;
a full disk keeps the previous checkpoint; a run that fails before its first checkpoint leaves no folder.

    python -m pytest tests/test_errors.py

The table runs each script's real `__main__` in this process (runpy), so a case costs milliseconds, not a torch import;
a few cases run as subprocesses to prove the command line itself.
"""
import errno
import os
import pickle
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import difffit
import fid
import files as files_py  # the module; `files` is the fixture of handed-in files below
import toy
import train
from conftest import ROOT, TINY  # and the fixture `base`: a tiny base checkpoint
from models import DiT, save_model

class Pickled:
    """Any object that is not plain tensors and containers: a checkpoint holding one must be refused, never unpickled."""

def cut(src, dst, keep=0.5):
    """A copy of src truncated to a share of its bytes (a crash during a copy or a download)."""
    data = open(src, "rb").read()
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data[:int(len(data) * keep)])
    return dst

def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path

@pytest.fixture(scope="module")
def files(tmp_path_factory, base):
    """Everything the bad cases hand in: a finished 2-step run of the tiny base and damaged copies of what it wrote,
    banks, statistics, weights and images good and bad, a plain file, a read-only folder. {name} -> path."""
    d = tmp_path_factory.mktemp("files")
    f = lambda *p: str(d.joinpath(*p))
    run = train.main(train.parser.parse_args(["--ckpt", base, "--results-dir", f("results"), "--global-batch-size", "4", "--max-steps", "2",
                                              "--ckpt-every", "1", "--log-every", "1", "--sample-steps", "2", "--precision", "fp32",
                                              "--eval-per-class", "0"]))
    ckpt, delta, model = (os.path.join(run, n) for n in ("ckpt.pt", "delta.safetensors", "model.safetensors"))
    torch.manual_seed(1)
    save_model(f("other.safetensors"), DiT(**TINY).state_dict(), TINY)  # same architecture, other weights
    torch.save({"w": Pickled()}, f("pickled.pt"))
    torch.save({"w": torch.zeros(3)}, f("tensors.pt"))  # plain tensors, but not a delta, a checkpoint or Inception weights
    put(f("garbage.pt"), b"garbage " * 125)
    for name, src in [("trunc_run", ckpt), ("garbage_run", f("garbage.pt")), ("pickled_run", f("pickled.pt")), ("tensors_run", f("tensors.pt"))]:
        cut(src, f(name, "ckpt.pt"), 0.5 if name == "trunc_run" else 1)
    os.makedirs(f("empty_run"))  # a run killed before its first checkpoint
    os.makedirs(f("unfinished", "000-toy-difffit"))  # results/ with only such a run
    cut(delta, f("trunc_delta.safetensors"))
    cut(model, f("trunc_model.safetensors"))
    # banks: samples (N, 3, 32, 32) of the tiny base, and what else a user might hand in
    np.save(f("bank.npy"), np.zeros((4, 3, 32, 32), np.float32))
    np.save(f("bank_16px.npy"), np.zeros((4, 3, 16, 16), np.float32))
    np.save(f("bank_int.npy"), np.zeros((4, 3, 32, 32), np.int64))
    np.save(f("bank_nan.npy"), np.full((4, 3, 32, 32), np.nan, np.float32))
    np.save(f("bank_objects.npy"), np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    cut(f("bank.npy"), f("bank_trunc.npy"))
    put(f("bank_pickle.npy"), pickle.dumps(Pickled()))
    # statistics and samples for fid.py
    fid.save_stats(f("toy_stats.npz"), np.zeros(128), np.eye(128), mode="toy", num_images=100)
    fid.save_stats(f("clean_stats.npz"), np.zeros(2048), np.eye(2048), mode="clean", num_images=100)
    np.savez(f("no_sigma.npz"), mu=np.zeros(70))
    np.savez(f("object_stats.npz"), mu=np.array([Pickled()], dtype=object), sigma=np.eye(1))
    cut(f("toy_stats.npz"), f("trunc_stats.npz"))
    np.savez(f("float_samples.npz"), arr_0=np.zeros((4, 32, 32, 3), np.float32))
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, f("wrong_weights.pth"))
    # images: a dataset folder <class>/<image>, a folder whose only images do not decode, an empty folder
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(f("imgs", c))
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(f("imgs", c, "0.jpg"))
    cut(f("imgs", "cat", "0.jpg"), f("broken", "truncated.jpg"))
    put(f("broken", "garbage.png"), b"not an image")
    os.makedirs(f("no_images"))
    for rel in ("empty_class/cat/0.jpg", "splits/test/cat/0.jpg", "splits/val/cat/0.jpg", "loose/0.jpg"):
        cut(f("imgs", "cat", "0.jpg"), f(rel), keep=1)
    os.makedirs(f("empty_class", "dog"))
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(put(f("one", "0.png"), b""))  # statistics need 2
    for i, size in enumerate((32, 32, 64)):  # toy-like samples of two sizes in one set
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(put(f("mixed", f"{i:06d}.png"), b""))
    np.savez(f("nan_stats.npz"), mu=np.full(128, np.nan), sigma=np.eye(128), mode=np.array("toy"), num_images=np.array(100))
    os.makedirs(f("folder.png"))
    put(f("afile"), b"a file, not a folder")
    os.makedirs(f("ro"))
    os.chmod(f("ro"), 0o555)
    names = dict(base=base, run=run, ckpt=ckpt, delta=delta, model=model, judge=toy.JUDGE_PATH)
    names.update({p.stem if p.is_file() else p.name: str(p) for p in d.iterdir()}, png_folder=f("folder.png"))
    return names

# -----------------------------------------------------------------------------
# the table: (script, arguments, a piece of the error line). {name} is a file of the fixture; every case is a kind of
# bad input a new user or a reliability engineer tried (issue 13) or one found since.

T = "train.py --ckpt {base} --results-dir results --global-batch-size 4 --precision fp32"  # what a train case starts from
CASES = [
    # train.py: counts, fractions, floats, ranges and choices that go together
    (T + " --global-batch-size 0", "--global-batch-size 0: use at least 1 image"),
    (T + " --global-batch-size -4", "--global-batch-size -4"),
    (T + " --grad-accum 0", "--grad-accum 0"),
    (T + " --global-batch-size 6 --grad-accum 4", "is not divisible by 1 ranks x --grad-accum 4"),
    (T + " --log-every 0", "--log-every 0"),
    (T + " --ckpt-every 0", "--ckpt-every 0"),
    (T + " --sample-every -1", "--sample-every -1"),
    (T + " --sample-steps 0", "--sample-steps 0: the sample grids take 2 .. 1000"),
    (T + " --sample-steps 1001", "--sample-steps 1001"),
    (T + " --eval-per-class -1", "--eval-per-class -1"),
    (T + " --eval-every -1", "--eval-every -1: use 0 (off)"),
    (T + " --eval-every 10 --eval-per-class 0", "--eval-every 10: the curve measures --eval-per-class samples"),
    ("train.py --data {png_folder} --eval-every 10 --results-dir results", "the toy measure needs a toy domain"),
    (T + " --max-steps 0", "--max-steps 0: train at least 1 step"),
    (T + " --max-steps -5", "--max-steps -5"),
    (T + " --lr 0", "--lr 0.0: use a positive"),
    (T + " --lr=-1e-3", "--lr -0.001"),
    (T + " --lr nan", "--lr nan"),
    (T + " --lr inf", "--lr inf"),
    (T + " --ema-decay nan", "--ema-decay nan"),
    (T + " --ema-decay 1", "at 1 the EMA never leaves the base"),
    (T + " --ema-decay -0.1", "--ema-decay -0.1"),
    (T + " --cfg-scale nan", "--cfg-scale nan"),
    (T + " --cfg-scale -1", "--cfg-scale -1.0"),
    (T + " --seed -1", "--seed -1"),
    (T + " --num-workers -1", "--num-workers -1"),
    (T + " --gamma-blocks 5-2", "--gamma-blocks 5-2: an empty range"),
    (T + " --gamma-blocks x-3", "expected a block range like 0-13"),
    (T + " --gamma-blocks 0-99", "--gamma-blocks 0-99: this DiT has blocks 0-1"),
    (T + " --gamma-blocks 0-1 --method lora-r8", "only --method difffit has γ"),
    (T + " --no-gamma-qkv --method bitfit", "--no-gamma-qkv: only --method difffit"),
    (T + " --image-size 64", "the toy domain toy is 32 pixels square"),
    (T + " --no-cache", "--no-cache: the toy data is made in memory"),
    (T + " --vae mse", "--vae mse: the toy data is pixels"),
    (T + " --data {imgs} --image-size 100", "--image-size 100: the VAE needs a multiple of 8"),
    (T + " --results-dir ''", "--results-dir : an empty path: pass a --results-dir you can write to"),
    (T + " --data {imgs} --image-size 4096", "--image-size 4096: the VAE needs a multiple of 8, at most 2048"),
    (T + " --data {imgs} --image-size 72 --ckpt scratch --method full --model DiT-S/8", "--image-size 72: DiT-S/8's patches are 8 latent pixels wide"),
    (T + " --data {imgs} --vae nope.safetensors", "--vae nope.safetensors: no such file"),
    (T + " --data nope", "--data nope: not a dataset"),
    (T + " --ckpt missing.pt", "--ckpt missing.pt: no such file"),
    (T + " --ckpt {delta}", "a DiffFit delta, not a model: pass it as --delta"),
    (T + " --ckpt {trunc_model}", "truncated"),
    (T + " --ckpt {garbage}", "not a torch or safetensors file"),
    (T + " --ckpt {pickled}", "refused: it is not plain tensors"),
    (T + " --ckpt {ckpt}", "a training checkpoint of train.py, not a model"),
    (T + " --diff-tuning nobank.npy", "no such bank"),
    (T + " --global-batch-size 10 --diff-tuning {bank_trunc}", "bank_trunc.npy: unreadable, truncated"),
    (T + " --global-batch-size 10 --diff-tuning {bank_pickle}", "a pickle, which is never loaded"),
    (T + " --global-batch-size 10 --diff-tuning {bank_objects}", "Python objects, which are never unpickled"),
    (T + " --global-batch-size 10 --diff-tuning {bank_16px}", "holds float32 (4, 3, 16, 16), not float32 samples (N, 3, 32, 32)"),
    (T + " --global-batch-size 10 --diff-tuning {bank_int}", "holds int64"),
    (T + " --diff-tuning {bank} --bank-fraction 1.5", "--bank-fraction 1.5: a share of each batch"),
    (T + " --diff-tuning {bank} --bank-fraction 0.01", "of a per-rank batch of 4 gives 0 bank samples"),
    (T + " --bank-fraction 0.5", "--bank-fraction 0.5: only Diff-Tuning uses it"),
    (T + " --global-batch-size 10 --diff-tuning {bank} --tau -1", "--tau -1.0"),
    (T + " --global-batch-size 10 --diff-tuning {bank_nan}", "bank_nan.npy: holds NaN or inf samples"),
    (T + " --global-batch-size 10 --diff-tuning {bank} --bank-weight nan", "--bank-weight nan"),
    (T + " --results-dir {afile}", "is a file, not a folder"),
    (T + " --results-dir {afile}/sub", "is a file, not a folder"),
    (T + " --results-dir {ro}", "is read-only for this user"),
    (T + " --resume nope", "--resume nope: not a run folder"),
    (T + " --resume {ckpt}", "not a run folder"),
    (T + " --resume {empty_run}", "no ckpt.pt there"),
    (T + " --resume {trunc_run}", "unreadable, truncated or not a torch file"),
    (T + " --resume {garbage_run}", "not a torch or safetensors file"),
    (T + " --resume {pickled_run}", "refused: it is not plain tensors and dicts"),
    (T + " --resume {tensors_run}", "not a checkpoint of train.py"),
    (T + " --resume latest --results-dir {unfinished}", "no run in"),
    (T + " --resume {run} --lr 0.01", "--lr 0.01: --resume continues the run with its own setting (0.001)"),
    (T + " --resume {run} --max-steps 1", "the run is at step 2 already"),
    ("train.py --resume {run} --precision auto", "--precision auto: --resume continues the run with its own setting (fp32)"),  # typed, = default
    (T + " --global-batch-size x", "argument --global-batch-size: invalid int value: 'x'"),
    (T + " --method nope", "argument --method: invalid choice: 'nope'"),
    (T + " --no-such-flag", "unrecognized arguments: --no-such-flag"),
    # sample.py
    ("sample.py --delta {delta} --per-class 0", "--per-class 0"),
    ("sample.py --delta {delta} --num-fid-samples 4 --batch-size 0", "--batch-size 0"),
    ("sample.py --delta {delta} --num-fid-samples -1", "--num-fid-samples -1"),
    ("sample.py --delta {delta} --num-bank-samples -1", "--num-bank-samples -1"),
    ("sample.py --delta {delta} --num-fid-samples 4 --num-bank-samples 4", "cannot go with --num-fid-samples"),
    ("sample.py --delta {delta} --cfg-scale nan", "--cfg-scale nan"),
    ("sample.py --delta {delta} --sampler dpm++ --steps 10,20", "DPM-Solver++ needs evenly spaced steps"),
    ("sample.py --delta {delta} --sampler sde-dpm++ --steps 10,20", "DPM-Solver++ needs evenly spaced steps"),
    ("sample.py --delta {delta} --sampler dpm--", "invalid choice: 'dpm--'"),
    ("sample.py --delta {delta} --steps 0", "--steps 0"),
    ("sample.py --delta {delta} --steps abc", "not understood"),
    ("sample.py --delta {delta} --classes a,b", "--classes a,b: expected class ids"),
    ("sample.py --delta {delta} --classes 0,99 --steps 2", "out of range: this model has classes 0..7"),
    ("sample.py --ckpt DiT-XL-2-256x256.pt --classes 7,1000 --steps 2", "--classes [1000] out of range: this model has classes 0..999"),  # no download first
    ("sample.py --delta {delta} --classes 0 --num-fid-samples 4", "cover every class in turn"),
    ("sample.py --delta {delta} --seed -1", "--seed -1"),
    ("sample.py --delta {delta} --ckpt {base}", "not both"),
    ("sample.py --delta missing.safetensors", "--delta missing.safetensors: no such file"),
    ("sample.py --delta {trunc_delta}", "truncated"),
    ("sample.py --delta {model}", "not a delta"),
    ("sample.py --delta {ckpt}", "a training checkpoint: pass its run's delta.safetensors"),
    ("sample.py --delta {garbage}", "not a torch or safetensors file"),
    ("sample.py --delta {pickled}", "refused"),
    ("sample.py --delta {tensors}", "not a delta"),
    ("sample.py --delta {delta} --base missing.safetensors", "--base missing.safetensors: no such file"),
    ("sample.py --delta {delta} --base {other} --steps 2", "trained on another base model"),
    ("sample.py --ckpt {base} --base {base}", "drop --base"),
    ("train.py --ckpt {base} --data {imgs} --results-dir results --precision fp32", "is VAE latents (4 channels): use a latent DiT"),
    ("train.py --data toy-source --ckpt scratch --results-dir results", "--ckpt scratch: a random init has no weights worth keeping frozen"),
    ("train.py --data toy-source --ckpt {base} --results-dir results --precision fp32", "a DiT of 8 classes, but --data toy-source keeps"),
    (T + " --data food101 --data-dir {no_images}", "food101 is not in "),  # before the VAE (which may not download here)
    (T + " --data flowers102 --data-dir {no_images}", "`python prepare.py --data flowers102 --download` fetches it"),
    ("sample.py --ckpt {judge} --steps 2", "toy_judge.pt: not a DiT checkpoint (its config has width, which no DiT has)"),
    ("sample.py --ckpt {no_images} --steps 2", "no_images: a folder, but not a diffusers DiT folder (no config.json in it)"),
    (T + " --ckpt {judge}", "toy_judge.pt: not a DiT checkpoint"),
    (T + " --ckpt {no_images}", "no_images: a folder, but not a diffusers DiT folder"),
    ("sample.py --ckpt missing.pt", "--ckpt missing.pt: no such file"),
    ("sample.py --ckpt {trunc_model}", "truncated"),
    ("sample.py --ckpt {delta}", "a DiffFit delta, not a model"),
    ("sample.py --delta {delta} --out {afile}/x.png", "is a file, not a folder"),
    ("sample.py --delta {delta} --out {ro}/x.png", "is read-only"),
    ("sample.py --delta {delta} --out {png_folder}", "a folder, not a file name"),
    ("sample.py --delta {delta} --out grid.jpg", "the grid is a PNG"),
    ("sample.py --delta {delta} --num-fid-samples 4 --out x.png", "pass --fid-dir instead"),
    ("sample.py --delta {delta} --fid-dir fid", "only FID sample sets go there"),
    ("sample.py --delta {delta} --num-fid-samples 4 --fid-dir {afile}", "is a file, not a folder"),
    ("sample.py --delta {delta} --num-bank-samples 4 --out bank.png", "a bank is an .npy file"),
    ("sample.py --results-dir {no_images}", "no finished run"),
    ("sample.py --delta {delta} --vae nope", "--vae nope: no such file"),
    ("sample.py --delta {delta} --sampler nope", "argument --sampler: invalid choice"),
    # fid.py
    ("fid.py {imgs} --mode toy", "need two inputs"),
    ("fid.py {imgs} --ref toy --split test --mode toy", "the toy judge reads the toy domains' 32 or 64 px square images"),
    ("fid.py {imgs} --ref food101 --data-dir {afile}", "food101 is not in"),
    ("fid.py {imgs} {imgs} {imgs} --mode toy", "need two inputs"),
    ("fid.py {imgs} --save-stats out --mode toy", "end the name in .npz"),
    ("fid.py {imgs} --save-stats {toy_stats} --mode toy", "exists; not overwriting it"),
    ("fid.py {imgs} --save-stats {afile}/x.npz --mode toy", "is a file, not a folder"),
    ("fid.py {imgs} --ref {toy_stats} --mode toy --batch-size 0", "--batch-size 0"),
    ("fid.py {imgs} --ref {toy_stats}", "holds toy statistics; pass --mode toy to measure the images alike"),  # before the Inception loads
    ("fid.py {imgs} --ref {toy_stats} --mode toy --num-workers -1", "--num-workers -1"),
    ("fid.py {imgs} --ref {toy_stats} --device nope", "not a torch device"),
    ("fid.py {imgs} --ref {toy_stats} --image-size 0", "--image-size 0"),
    ("fid.py {imgs} --ref toy --mode toy --image-size 64", "the toy data comes in its own size"),
    ("fid.py {imgs} --ref {clean_stats} --weights missing.pth", "--weights missing.pth: no such file"),
    ("fid.py {imgs} --ref {clean_stats} --weights {garbage}", "not a torch or safetensors file"),
    ("fid.py {imgs} --ref {clean_stats} --weights {pickled}", "refused"),
    ("fid.py {imgs} --ref {clean_stats} --weights {wrong_weights}", "not the 2015-12-05 Inception"),
    ("fid.py {imgs} --ref {toy_stats} --mode toy --weights x.pth", "the toy mode uses the shipped toy judge"),
    ("fid.py {imgs} --ref {toy_stats} --mode toy --download", "the toy mode uses the shipped toy judge"),
    ("fid.py {imgs} --ref {trunc_stats} --mode toy", "trunc_stats.npz: unreadable, truncated"),
    ("fid.py {imgs} --ref {no_sigma} --mode toy", "no mu (d,) and sigma (d, d)"),
    ("fid.py {imgs} --ref {object_stats} --mode toy", "Python objects, which are never unpickled"),
    ("fid.py {float_samples} --ref {toy_stats} --mode toy", "holds neither statistics"),
    ("fid.py {broken} --ref {toy_stats} --mode toy --num-workers 0", "none of the 2 images could be read"),
    ("fid.py {no_images} --ref {toy_stats} --mode toy", "no images under"),
    ("fid.py {imgs} --ref toy --split val --mode toy", "--split val: the toy domains have a train and a test split"),
    ("fid.py {one} --save-stats new.npz --mode toy", "one: 1 image; statistics need at least 2"),
    ("fid.py {one} --ref toy --split test --mode toy", "one: 1 image; statistics need at least 2"),
    ("fid.py {mixed} --ref {toy_stats} --mode toy --num-workers 0", "mixed: images of different sizes (32x32 and 64x64)"),
    ("fid.py {imgs} --ref {nan_stats} --mode toy", "nan_stats.npz: mu or sigma holds NaN or inf"),
    ("fid.py nowhere/x --ref {toy_stats} --mode toy", "not an image folder, a .npz or a dataset name"),
    ("fid.py nope --ref {toy_stats} --mode toy", "is neither a dataset"),
    ("fid.py {toy_stats} {clean_stats} --allow-mode-mismatch", "statistics of different feature sizes (128 vs 2048)"),
    ("fid.py {toy_stats} {clean_stats}", "mode mismatch: toy vs clean"),
    ("fid.py {imgs} --mode nope", "argument --mode: invalid choice"),
    # prepare.py
    ("prepare.py --data toy", "nothing to encode"),
    ("prepare.py --data toy-source", "nothing to encode"),
    ("prepare.py --data {imgs} --export out", "only the toy domains (toy-source, toy, toy-art, toy-64) are made here"),
    ("prepare.py --data toy --export {afile}/sub", "is a file, not a folder"),
    ("prepare.py --data nope", "--data nope: not a dataset"),
    ("prepare.py --data {imgs} --batch-size 0", "--batch-size 0"),
    ("prepare.py --data {imgs} --num-workers -1", "--num-workers -1"),
    ("prepare.py --data {imgs} --vae missing.safetensors", "--vae missing.safetensors: no such file"),
    ("prepare.py --data {imgs} --vae {garbage} --data-dir data", "VAE"),
    ("prepare.py --data {imgs} --data-dir {afile}", "is a file, not a folder"),
    ("prepare.py --data {imgs} --download", "only torchvision's datasets download"),
    ("prepare.py --data cub200 --data-dir data", "no image folder"),
    ("prepare.py --data {imgs} --image-size 100", "--image-size 100: use a multiple of 8"),
    ("prepare.py --data {imgs} --image-size 100000", "--image-size 100000: use at most 2048"),
    ("prepare.py --data toy --export {imgs}", "not empty: pass a new or empty folder"),
    ("prepare.py --data {empty_class} --data-dir data", "class folders without an image (1: dog): remove them, or add their images"),
    ("prepare.py --data {loose} --data-dir data", "move its 1 loose images into one sub-folder per class"),
    ("prepare.py --data {splits} --data-dir data", "holds the split folders test, val but no train/: pass --data"),
    ("prepare.py --data {imgs} --data-dir {imgs}/cache", "inside --data"),
    (T + " --data {imgs} --data-dir {imgs}/cache", "where its caches would be read as a class: pass a --data-dir outside it"),
    (T + " --data {splits}", "holds the split folders test, val but no train/"),
    (T + " --data {empty_class}", "class folders without an image (1: dog)"),
    # study.py
    ("study.py --only table9", "--only table9: comma-separated names of table1"),
    ('study.py --only ""', "--only : comma-separated names of table1"),  # empty: refused, not the whole 2-hour study
    ("study.py --seeds 0", "--seeds 0: use at least 1 seed"),
    ("study.py --max-steps 0", "--max-steps 0"),
    ("study.py --eval-per-class 0", "--eval-per-class 0: measure at least 1 sample per class"),
    ("study.py --num-bank-samples 0", "--num-bank-samples 0: use at least 1 sample"),
    ("study.py --sample-steps 1", "--sample-steps 1: SDE-DPM-Solver++ takes 2 .. 1000"),
    ("study.py --results-dir {afile}/sub", "is a file, not a folder"),
    ("study.py --precision fp16", "argument --precision: invalid choice"),
    # bench.py and difffit.py
    ("bench.py --batch-size 0", "--batch-size 0"),
    ("bench.py --methods difffit,nope", "--methods difffit,nope"),
    ("bench.py --iters 0", "--iters 0"),
    ("bench.py --image-size 100", "--image-size 100"),
    ("bench.py --profile 'difffit nonsense'", "--profile difffit nonsense: a training row: one method"),
    ("bench.py --profile 'full difffit'", "--profile full difffit: a training row: one method"),
    ("bench.py --image-size 24", "--image-size 24: the latents are /8 and DiT-S/2's patches 2 wide: use a positive multiple of 16"),
    ("difffit.py --image-size 24 --model DiT-XL/4", "--image-size 24: the latents are /8 and DiT-XL/4's patches 4 wide: use a positive multiple of 32"),
    ("bench.py --what sample --samplers ddpm1", "at least 2 steps"),
    ("bench.py --what sample --samplers euler20", "--samplers euler20"),
    ("bench.py --what sample --samplers dpm++10,15,20", "--samplers"),
    ("bench.py --what sample --ref-steps x", "--ref-steps ddpmx"),
    ("bench.py --profile nope", "--profile nope"),
    ("bench.py --what sample --vae", "drop --vae"),
    ("bench.py --num-classes 0", "--num-classes 0: use at least 1 class"),
    ("bench.py --warmup -1", "--warmup -1: use 0 or more"),
    ("bench.py --rounds 0", "--rounds 0: use at least 1 round"),
    ("bench.py --what sample --cfg-scale nan", "--cfg-scale nan: use a finite guidance scale"),
    ("difffit.py --num-classes 0", "--num-classes 0"),
    ("difffit.py --out x", "only --export writes a folder"),
    ("difffit.py --export missing.safetensors --out x", "--export missing.safetensors: no such file"),
    ("difffit.py --export {model} --out x", "not a delta"),
    ("difffit.py --export {delta}", "needs --out DIR"),
    ("difffit.py --export {delta} --out {afile}", "is a file, not a folder"),
]

def tree(*roots):
    """Every file and folder under roots, the files with their size and time: what a case may not change."""
    stat = lambda p: (os.path.getsize(p), os.path.getmtime(p)) if os.path.isfile(p) else "folder"
    return {os.path.join(r, n): stat(os.path.join(r, n)) for root in roots for r, ds, fs in os.walk(root) for n in ds + fs}

def non_root_access(monkeypatch):
    """root may write into a read-only folder; play a normal user, whom its mode bits stop."""
    real = os.access
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: real(p, mode, **kw) and not (mode & os.W_OK and not os.stat(p).st_mode & 0o200))

def check_one_error_line(code, err, needle):
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert not any(w in err for w in ("Traceback", "weights_only", "allow_pickle", "pickle.load", "unsafe")), err

def test_a_folder_the_file_system_refuses_is_found_before_the_run(tmp_path, monkeypatch):
    """os.access says yes to root everywhere, and /proc or a read-only mount refuse anyway: unwritable makes a folder to be sure."""
    def refuse(dir):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(files_py.tempfile, "mkdtemp", refuse)
    assert files_py.unwritable(str(tmp_path / "run")) == f"{tmp_path} does not take new files (Read-only file system)"
    monkeypatch.undo()
    assert files_py.unwritable(str(tmp_path / "run")) is None and os.listdir(tmp_path) == []  # the try leaves nothing behind

@pytest.mark.parametrize("command, needle", CASES, ids=[c.replace(T, "train.py") for c, _ in CASES])
def test_bad_input_gives_one_error_line_and_writes_nothing(command, needle, files, tmp_path, monkeypatch, capsys):
    script, *argv = shlex.split(command.format(**files))
    monkeypatch.chdir(tmp_path)  # relative paths (results/, data/, pretrained/) land where they are watched
    monkeypatch.delenv("RANK", raising=False)
    non_root_access(monkeypatch)
    monkeypatch.setattr(files_py, "PRETRAINED_DIR", "pretrained")
    monkeypatch.setitem(files_py.PRETRAINED, "sd-vae-ft-ema.safetensors", ("http://127.0.0.1:1/vae", None))  # no case may download
    before = tree(tmp_path, os.path.dirname(files["bank"]))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    check_one_error_line(code, capsys.readouterr().err, needle)
    assert tree(tmp_path, os.path.dirname(files["bank"])) == before

@pytest.mark.parametrize("script", ["train.py", "sample.py", "fid.py", "prepare.py", "bench.py", "study.py"])  # difffit.py's parser is local
def test_every_flag_that_takes_a_free_value_has_a_bad_case(script):
    """A flag added to a script without a case here fails this (choices and switches: argparse's own line covers them)."""
    import importlib
    parser = importlib.import_module(script[:-3]).parser
    free = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.nargs != 0 and a.choices is None and a.help != "==SUPPRESS=="}
    tried = {w.split("=")[0] for c, _ in CASES if c.split()[0] == script for w in c.split() if w.startswith("--")}
    assert sorted(free - tried) == []

def test_a_vae_that_cannot_be_downloaded_says_where_to_put_it_and_leaves_no_folder(files, tmp_path, monkeypatch, capsys):
    """prepare.py's good 'put the file at ...' line, as one line (it came at the end of a traceback)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files_py, "PRETRAINED_DIR", str(tmp_path / "pretrained"))
    with socket.socket() as s:  # offline: a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(files_py.PRETRAINED, "sd-vae-ft-ema.safetensors", (f"http://127.0.0.1:{port}/vae", None))
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--data", files["imgs"], "--data-dir", str(tmp_path / "data")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "prepare.py"), run_name="__main__")
    err = capsys.readouterr().err
    check_one_error_line(e.value.code, err, f"put the file at {tmp_path / 'pretrained' / 'sd-vae-ft-ema.safetensors'}")
    assert os.listdir(tmp_path) == []

@pytest.mark.parametrize("command, needle", [
    ("train.py --resume {pickled_run}", "refused: it is not plain tensors and dicts"),
    ("sample.py --delta {trunc_delta}", "truncated"),
    ("fid.py {imgs} --ref {clean_stats} --weights {pickled} --device cpu", "refused"),
    ("prepare.py --data toy", "nothing to encode"),
])
def test_the_command_line_gives_the_same_one_line(command, needle, files, tmp_path):
    script, *argv = shlex.split(command.format(**files))
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    check_one_error_line(r.returncode, r.stderr, needle)
    assert os.listdir(tmp_path) == []

@pytest.mark.parametrize("command", ["train.py --ckpt {base} --precision fp32", "sample.py --ckpt {base} --steps 2", "prepare.py --data {imgs}"])
def test_rank_without_the_rest_of_torchrun_says_how_to_launch(command, files, tmp_path):
    """RANK alone (a variable left over in a shell) made torch fail with env:// advice; with WORLD_SIZE, it waited for peers."""
    script, *argv = shlex.split(command.format(**files))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**env, "RANK": "0", "MASTER_PORT": "29511", "OMP_NUM_THREADS": "1"})
    check_one_error_line(r.returncode, r.stderr, "RANK is set, so this process would be one of a torchrun launch, but WORLD_SIZE, "
                                                 "LOCAL_RANK, MASTER_ADDR are not: launch it with torchrun, or unset RANK")
    assert os.listdir(tmp_path) == []

# -----------------------------------------------------------------------------
# runs that fail part way: what they leave behind

def run_args(base, results, *extra):
    return train.parser.parse_args(["--ckpt", base, "--results-dir", str(results), "--global-batch-size", "4", "--log-every", "1",
                                    "--sample-steps", "2", "--precision", "fp32", "--eval-per-class", "0", *extra])

def steps_of(run_dir):
    """The step numbers of metrics.csv's rows and of log.txt's step lines, in order."""
    rows = [int(l.split(",")[0]) for l in open(os.path.join(run_dir, "metrics.csv")).read().splitlines()[1:]]
    logged = [int(l.split()[1].split("/")[0]) for l in open(os.path.join(run_dir, "log.txt")) if l.startswith("step ")]
    return rows, logged

def test_killed_run_resumes_with_logs_as_if_nothing_had_happened(tmp_path, base):
    """SIGKILL after the first checkpoint and some steps more; --resume redoes those steps, and the logs hold each step
    once, with the losses of a run that was never interrupted."""
    results = tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--ckpt", base, "--results-dir", str(results), "--global-batch-size", "4",
           "--log-every", "1", "--ckpt-every", "3", "--max-steps", "100000", "--sample-steps", "2", "--precision", "fp32", "--eval-per-class", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline, saved = time.time() + 240, None
    while time.time() < deadline and p.poll() is None:  # looked at while stopped: a checkpoint, and logged steps past it
        p.send_signal(signal.SIGSTOP)
        run_dir = str(next(results.iterdir())) if results.is_dir() and any(results.iterdir()) else None
        if run_dir and os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            saved = torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)["step"]
            if max(steps_of(run_dir)[0], default=0) > saved:
                break
        p.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    else:
        p.kill()
        pytest.fail(f"no checkpoint with steps past it: {(tmp_path / 'stderr.txt').read_text()[-2000:]}")
    p.send_signal(signal.SIGKILL)
    p.wait()
    end = saved + 4
    r = subprocess.run(cmd[:2] + ["--resume", run_dir, "--max-steps", str(end)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows, logged = steps_of(run_dir)
    assert rows == logged == list(range(1, end + 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two processes: the same sums in the same order
    try:
        straight = train.main(run_args(base, tmp_path / "straight", "--ckpt-every", "3", "--max-steps", str(end)))
    finally:
        torch.set_num_threads(threads)
    table = lambda d: [l.split(",")[:3] for l in open(os.path.join(d, "metrics.csv")).read().splitlines()]  # step, loss, lr
    assert table(run_dir) == table(straight)
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]

def stop_while_training(script, flags, ready, sig):
    """Run a script in its own process until ready() holds, send it sig: (exit code, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal, also when pytest runs in the background
    deadline = time.time() + 240
    while time.time() < deadline and not ready():
        time.sleep(0.1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err

def train_flags(base, results, *extra):
    return ["--ckpt", base, "--results-dir", str(results), "--global-batch-size", "4", "--max-steps", "100000", "--sample-steps", "2",
            "--precision", "fp32", "--eval-per-class", "0", *extra]

def test_sigterm_before_the_first_checkpoint_leaves_no_run_folder(tmp_path, base):
    """SIGTERM is what torchrun sends every rank once one has failed, and what a scheduler sends: it unwinds as Ctrl-C does."""
    results = tmp_path / "results"
    trains = lambda: any(results.glob("*/metrics.csv")) and "step " in next(results.glob("*/log.txt")).read_text()
    rc, out, err = stop_while_training("train.py", train_flags(base, results, "--log-every", "1"), trains, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert os.listdir(results) == []
    assert "stopped at step" in out and ": no checkpoint had been written, so the run folder is removed" in out

def test_ctrl_c_says_which_checkpoint_a_resume_continues_from_without_a_traceback(tmp_path, base):
    results = tmp_path / "results"
    saved = lambda: any(results.glob("*/ckpt.pt"))
    rc, out, err = stop_while_training("train.py", train_flags(base, results, "--ckpt-every", "1"), saved, signal.SIGINT)
    assert rc == -signal.SIGINT and "Traceback" not in err, err[-2000:]  # killed by SIGINT, as Python ends after Ctrl-C: a shell loop stops
    run_dir = next(results.glob("*"))
    step = torch.load(run_dir / "ckpt.pt", weights_only=True)["step"]
    assert f"is intact; --resume {run_dir} continues from it" in out, out[-2000:]
    assert f"(step {step})" in out or f"(step {step - 1})" in out  # (a Ctrl-C between a checkpoint's rename and the count names the one before)

def test_ctrl_c_during_an_fid_set_keeps_its_samples_and_says_so(tmp_path, base):
    out = tmp_path / "set"
    flags = ["--ckpt", base, "--num-fid-samples", "100000", "--batch-size", "2", "--steps", "2", "--fid-dir", str(out)]  # minutes
    rc, stdout, err = stop_while_training("sample.py", flags, lambda: (out / "000001.png").exists(), signal.SIGINT)
    assert rc == -signal.SIGINT and "Traceback" not in err, err[-2000:]
    assert "stopped: the finished samples are kept, and the same command goes on from them" in stdout
    assert (out / "000000.png").exists() and not list(out.glob("*.tmp"))

def test_ctrl_c_during_an_export_of_toy_images_is_quiet(tmp_path):
    out = tmp_path / "imgs"
    rc, stdout, err = stop_while_training("prepare.py", ["--data", "toy-source", "--export", str(out)], lambda: any(out.rglob("*.png")), signal.SIGINT)
    assert rc == -signal.SIGINT and "Traceback" not in err, err[-2000:]
    assert "latent cache" not in stdout  # there is none: the line is for an interrupted encode

def test_a_run_that_is_training_cannot_be_resumed_by_a_second_job(tmp_path, base, monkeypatch):
    run_dir = train.main(run_args(base, tmp_path / "results", "--max-steps", "2"))
    def create_model(*a):
        raise AssertionError("the second job loaded the model (minutes for DiT-XL/2) before finding the run taken")
    monkeypatch.setattr(train, "create_model", create_model)
    with open(os.path.join(run_dir, "log.txt"), "a") as log:  # what the training job holds while it runs
        import fcntl
        fcntl.flock(log, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another process is training this run now: wait for it to stop"):
            train.main(train.parser.parse_args(["--resume", run_dir, "--max-steps", "3"]))
    assert open(os.path.join(run_dir, "log.txt")).read().count("finished at step 2") == 1  # its log untouched

def test_a_rank_that_stops_because_rank_0_failed_says_so_in_one_line(tmp_path, base):
    """Only rank 0 checks a sample set's settings; the other ranks, waiting for it, lose their peer: no traceback from them."""
    os.makedirs(tmp_path / "set")
    (tmp_path / "set" / "settings.json").write_text('{"samples": 99}')  # begun with other settings
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py", "--ckpt", base,
                        "--num-fid-samples", "4", "--steps", "2", "--batch-size", "2", "--fid-dir", str(tmp_path / "set")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stderr.count("error: --fid-dir") == 1, r.stderr[-3000:]
    assert "by peer" not in r.stderr and 'sample.py", line' not in r.stderr  # rank 1 said one line, or torchrun's SIGTERM stopped it first

def test_only_a_lost_peer_is_cut_to_one_line():
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:46468")
    assert files_py.peer_lost(lost) and files_py.peer_lost(torch.distributed.DistBackendError("NCCL communicator was aborted"))
    assert not files_py.peer_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))  # its own: a traceback

def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_no_temp_file(tmp_path, base, monkeypatch, capsys):
    real, calls = torch.save, [0]
    def save(obj, f, *a, **k):  # the second checkpoint: half written, then the disk is full
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        train.main(run_args(base, tmp_path / "results", "--ckpt-every", "2", "--max-steps", "6"))
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "results").iterdir()
    check_one_error_line(e.value.code, capsys.readouterr().err, f"No space left on device); the previous checkpoint {run_dir / 'ckpt.pt'} (step 2) is intact")
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["step"] == 2
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]

def test_full_disk_at_the_first_checkpoint_leaves_no_run_folder(tmp_path, base, monkeypatch, capsys):
    def save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        train.main(run_args(base, tmp_path / "results", "--ckpt-every", "2", "--max-steps", "6"))
    check_one_error_line(e.value.code, capsys.readouterr().err, "no checkpoint had been written, so the run folder is removed")
    assert os.listdir(tmp_path / "results") == []

def poison_after(monkeypatch, n):
    """Losses turn NaN after n micro-steps."""
    real = train.create_diffusion
    def poisoned(respacing):
        d = real(respacing)
        losses, calls = d.training_losses, [0]
        def training_losses(*a, **k):
            out = losses(*a, **k)
            calls[0] += 1
            if calls[0] > n:
                out["loss"] = out["loss"] * float("nan")
            return out
        d.training_losses = training_losses
        return d
    monkeypatch.setattr(train, "create_diffusion", poisoned)

def test_nan_before_the_first_checkpoint_claims_none_and_leaves_no_folder(tmp_path, base, monkeypatch, capsys):
    poison_after(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        train.main(run_args(base, tmp_path / "results", "--ckpt-every", "5", "--max-steps", "6"))
    check_one_error_line(e.value.code, capsys.readouterr().err, "loss is nan at step 3; stopped without saving: no checkpoint had been written")
    assert os.listdir(tmp_path / "results") == []

def test_nan_after_a_checkpoint_names_it(tmp_path, base, monkeypatch, capsys):
    poison_after(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train.main(run_args(base, tmp_path / "results", "--ckpt-every", "2", "--max-steps", "6"))
    (run_dir,) = (tmp_path / "results").iterdir()
    assert f"the previous checkpoint {run_dir / 'ckpt.pt'} (step 2) is intact" in capsys.readouterr().err
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["step"] == 2

def test_resume_latest_takes_the_newest_run_with_a_checkpoint(files, tmp_path):
    results = tmp_path / "results"
    os.makedirs(results / "000-toy-difffit")
    os.makedirs(results / "007-toy-difffit")  # newer, killed before its first checkpoint
    cut(files["ckpt"], str(results / "000-toy-difffit" / "ckpt.pt"), keep=1)
    args, _, ckpt = train.resolve_args(train.parser.parse_args(["--resume", "latest", "--results-dir", str(results)]))
    assert args.resume == str(results / "000-toy-difffit") and ckpt["step"] == 2

def test_run_folders_are_numbered_past_gaps_and_past_999(tmp_path):
    for d in ("000-a", "002-a", "notes", "1000-a"):
        os.makedirs(tmp_path / d)
    assert os.path.basename(train.claim_run_dir(str(tmp_path), "b")) == "1001-b"
    assert os.path.basename(train.claim_run_dir(str(tmp_path), "b")) == "1002-b"

def test_a_resumed_run_finds_its_repo_base_from_any_folder(files, tmp_path, monkeypatch):
    """A delta names a base in this repo relative to the repo, so a resumed run rebuilds it wherever it is started."""
    delta = difffit.read_delta(files["delta"])
    assert difffit.base_path(difffit.base_ref(toy.BASE_PATH)) == toy.BASE_PATH
    monkeypatch.chdir(tmp_path)
    args, _, _ = train.resolve_args(train.parser.parse_args(["--resume", files["run"]]))
    assert args.ckpt == delta["base"] == files["base"]

def test_fid_skips_and_reports_an_unreadable_image(files, tmp_path, capsys):
    """As train.py and prepare.py do: the folder's readable images count, the others are named in one warning line."""
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, name in enumerate(("cat", "dog")):  # 32 px, as the toy judge reads
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(folder / f"{name}.jpg")
    cut(os.path.join(files["broken"], "truncated.jpg"), str(folder / "truncated.jpg"), keep=1)
    fid.main(fid.parser.parse_args([str(folder), "--save-stats", str(tmp_path / "stats.npz"), "--mode", "toy", "--num-workers", "0"]))
    out, err = capsys.readouterr()
    assert f"{folder}: 2 images" in out
    (line,) = err.splitlines()
    assert line.startswith(f"warning: skipped 1 unreadable images ({folder / 'truncated.jpg'}: image file is truncated")

def test_prepare_makes_no_cache_when_no_image_can_be_read(files, tmp_path, capfd):
    import prepare
    for name in ("cat", "dog"):
        cut(os.path.join(files["broken"], "truncated.jpg"), str(tmp_path / "pics" / name / "truncated.jpg"), keep=1)
    with pytest.raises(ValueError, match="pics: none of its 2 images could be read"):
        prepare.encode_cache(str(tmp_path / "pics"), str(tmp_path / "data"), "train", 32, None, "ema")  # no VAE call is made
    assert os.listdir(tmp_path / "data") == []  # not even the folder made for the cache
    err = capfd.readouterr().err
    assert err.count("warning: skipping unreadable image") == 2, err  # each named once
