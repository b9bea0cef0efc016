"""
The paper's experiments rerun on the toy world (toy.py) with seeds: Table 1 (every method on every target), Table 4b
(where γ goes), Table 4d (the learning rate), Fig. 6 (how fast each method adapts), the pos-embed trick of §4.3
(Table 3, Fig. 5), Diff-Tuning on top of full fine-tuning and of DiffFit, and the samplers' quality vs network calls.
DiffFit: Xie et al. 2023, arXiv:2304.06648. Diff-Tuning: Zhong et al. 2024, arXiv:2406.00773.

    python study.py                                   # all of it, 3 seeds: 2 h 1 min on 2 CPU cores with AVX512-BF16 -> results/study/
    python study.py --only table4d,fig6               # some of it (runs other experiments share are reused)
    python study.py --max-steps 2 --seeds 1 --eval-per-class 1 --sample-steps 2 --results-dir /tmp/study   # a smoke test

Every cell is a train.py run, in this process, in <results-dir>/runs/<cell>/seed<k>/. A finished run is never redone and an
interrupted one resumes from its checkpoint, so a stopped study continues where it stopped (with the settings it began
with, kept in <results-dir>/settings.json); the tables and plots are rewritten from the runs' own files every time. matplotlib
draws the plots; without it they are skipped.
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import difffit
import models
import sample
import toy
import train
from files import atomic_write, check_flags, unwritable

parser = argparse.ArgumentParser(description="The paper's tables and figures at toy scale, with seeds (CPU).")
parser.add_argument("--only", default=None,
                    help="comma-separated experiments to run and write (default: all of table1, table4b, table4d, fig6, posembed, samplers, difftuning)")
parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (0, 1, ...) (default: %(default)s)")
parser.add_argument("--max-steps", type=int, default=200,
                    help="optimizer steps of every run (batch 32; toy-64: 8); the curves measure every quarter of it (toy-64: half) (default: %(default)s)")
parser.add_argument("--eval-per-class", type=int, default=16, help="samples per class of each toy measure (default: %(default)s)")
parser.add_argument("--sample-steps", type=int, default=10, help="SDE-DPM-Solver++ network calls per sample of each toy measure (default: %(default)s)")
parser.add_argument("--num-bank-samples", type=int, default=1024, help="Diff-Tuning: samples of the base in the knowledge bank (default: %(default)s)")
parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="training and sampling: bf16 autocast where the hardware has it (auto); the judge is fp32 (default: %(default)s)")
parser.add_argument("--results-dir", default="results/study", help="where the runs, tables and plots go (default: %(default)s)")

# -----------------------------------------------------------------------------
# the experiments: cells of (label, data, train.py flags). Cells with the same data and flags are the same runs, so
# e.g. Table 1's DiffFit on `toy` is also Table 4b's default γ row, Table 4d's 1x row and a Fig. 6 curve.

TARGETS = ["toy", "toy-art"]  # (a) new combinations of the source's parts, (b) a new style; (c) toy-64 is the pos-embed trick's
BASE_LR = 1e-3  # the toy base was pretrained at 1e-3 (README): Table 4d's ratios are to that, as the paper's are to DiT's 1e-4
DIFFFIT = ["--method", "difffit"]  # train.py's DiffFit: γ on the first half of the blocks (0-3 of 8), lr 1e-3

# toy-64 has 4x the tokens: a quarter of the batch keeps the tokens per step, and 3 samples per class (of 40) keep the
# measure affordable
TOY64 = ["--global-batch-size", "8", "--eval-per-class", "3"]

EXPERIMENTS = {
    "table1": [(f"{m}", d, ["--method", m]) for d in TARGETS for m in difffit.METHODS]
              + [("full, lr 1e-3", d, ["--method", "full", "--lr", "1e-3"]) for d in TARGETS],
    "table4b": [("0-1", "toy", DIFFFIT + ["--gamma-blocks", "0-1"]), ("0-3 (default)", "toy", DIFFFIT),
                ("0-7", "toy", DIFFFIT + ["--gamma-blocks", "0-7"]),
                ("6-7", "toy", DIFFFIT + ["--gamma-blocks", "6-7"]), ("4-7", "toy", DIFFFIT + ["--gamma-blocks", "4-7"])],
    "table4d": [(f"{r:g}x", "toy", DIFFFIT + ([] if r == 1 else ["--lr", f"{r * BASE_LR:g}"])) for r in (0.1, 1, 5, 10, 20)],
    "fig6": [(m, "toy", ["--method", m]) for m in ("full", "bitfit", "difffit", "adapt-parallel", "vpt-deep")],
    "posembed": [("with the trick", "toy-64", DIFFFIT + TOY64), ("without", "toy-64", DIFFFIT + TOY64 + ["--no-pos-trick"])],
    "samplers": [("difffit", "toy", DIFFFIT)],  # the first seed's model, sampled by each of SAMPLERS with each of NOISE_SEEDS
    "difftuning": [(f"{m}{' + Diff-Tuning' * dt}", "toy", ["--method", m] + (["--diff-tuning", "BANK"] if dt else []))
                   for m in ("full", "difffit") for dt in (False, True)],
}

# every run's toy measure: named here, not train.py's default, so that the study's FDs keep meaning the same thing
MEASURE_SAMPLER = "sde-dpm++"  # at 10 calls within seed noise of DDPM-250 in the sweep below (README)

# quality vs network calls per sample (sample.py --sampler, --steps), each compared with DDPM-250
SAMPLERS = [("ddpm", 250), ("ddpm", 100), ("ddpm", 50), ("ddpm", 25), ("ddim", 50), ("ddim", 25), ("ddim", 10),
            ("dpm++", 25), ("dpm++", 20), ("dpm++", 15), ("dpm++", 10), ("sde-dpm++", 25), ("sde-dpm++", 20), ("sde-dpm++", 15), ("sde-dpm++", 10)]
NOISE_SEEDS = (0, 1, 2, 3)  # each sampler draws the same samples' start noise under seed k; 4 so that 2 standard errors mean something

# the row each row is compared with: the default γ blocks, the 1x lr, the trick, the same method without Diff-Tuning
VERSUS = {"table4b": lambda i: 1, "table4d": lambda i: 1, "posembed": lambda i: 0, "difftuning": lambda i: i - i % 2}

def cell_name(data, flags):
    """A folder name for (data, flags): the same cell always gets the same one."""
    return "-".join([data] + [f.lstrip("-").replace(".", "p") for f in flags if f != "BANK"] + ["bank"] * ("BANK" in flags))

# -----------------------------------------------------------------------------
# running the cells, and reading what a run wrote

def run_cell(args, data, flags, seed, bank):
    """Train one seed of one cell (or finish it); returns its run folder."""
    seed_dir = os.path.join(args.results_dir, "runs", cell_name(data, flags), f"seed{seed}")
    if os.path.exists(os.path.join(seed_dir, "failed")):  # stopped by train.py before: the same run would stop again
        return None
    runs = [d for _, d in train.runs(seed_dir)]
    if runs and os.path.exists(os.path.join(runs[-1], "toy_ema.json")):
        return runs[-1]
    curve = any((data, flags) == (d, f) for name in ("fig6", "posembed") for _, d, f in EXPERIMENTS[name])  # measured on the way: toy 3 times, toy-64 once
    every = max(args.max_steps // (2 if data == "toy-64" else 4), 1)
    argv = ["--data", data, "--max-steps", str(args.max_steps), "--seed", str(seed), "--results-dir", seed_dir,
            "--eval-per-class", str(args.eval_per_class), "--eval-every", str(every if curve else 0),
            "--sampler", MEASURE_SAMPLER, "--sample-steps", str(args.sample_steps),
            "--log-every", str(every), "--ckpt-every", str(args.max_steps), "--precision", args.precision] + [bank if f == "BANK" else f for f in flags]
    if runs and os.path.exists(os.path.join(runs[-1], "ckpt.pt")):  # interrupted: continue it
        argv = ["--resume", runs[-1]]
    print(f"\n=== {cell_name(data, flags)} seed {seed}: train.py {' '.join(argv)}", flush=True)
    try:
        return train.main(train.parser.parse_args(argv))
    except SystemExit:  # train.py stopped the run (a NaN loss at a large lr) and said why: the cell records it as failed
        os.makedirs(seed_dir, exist_ok=True)
        open(os.path.join(seed_dir, "failed"), "w").close()
        return None

def read_run(run_dir):
    """The numbers of one finished run: the judge's FD and accuracy of the EMA at the end and of the base, the curve
    (step -> FD, accuracy), trained parameters, delta size, s/step (training only, measures excluded)."""
    load = lambda name: json.loads(Path(run_dir, name).read_text())
    end, base = load("toy_ema.json"), load("toy_base.json")
    curve = {0: (base["frechet_distance"], base["accuracy"])}
    csv = os.path.join(run_dir, "toy_curve.csv")  # runs with --eval-every only
    for line in Path(csv).read_text().splitlines()[1:] if os.path.exists(csv) else []:
        step, fd, _, acc, _ = line.split(",")
        curve[int(step)] = (float(fd), float(acc))  # a resumed run may have measured a step twice: the last one counts
    curve[end["step"]] = (end["frechet_distance"], end["accuracy"])
    rows = Path(run_dir, "metrics.csv").read_text().splitlines()[1:]
    with open(os.path.join(run_dir, "log.txt")) as f:
        batch = json.loads(f.readline().split("args: ", 1)[1])["global_batch_size"]  # its first line
    s_step = statistics.median(batch / float(r.split(",")[3]) for r in rows)  # from img/s per log interval
    delta = os.path.join(run_dir, "delta.safetensors")
    params = sum(v.numel() for v in difffit.read_delta(delta)["params"].values())
    return dict(dir=run_dir, fd=end["frechet_distance"], acc=end["accuracy"], floor=end["floor"], base_fd=base["frechet_distance"],
                base_acc=base["accuracy"], curve=curve, params=params, delta_mb=os.path.getsize(delta) / 1e6, s_step=s_step)

def sampler_sweep(args, run_dir):
    """{(sampler, steps): [judge result of each of NOISE_SEEDS]} for the EMA of run_dir, cached in <results-dir>/samplers.json."""
    path = os.path.join(args.results_dir, "samplers.json")
    done = {tuple(json.loads(k)): v for k, v in json.loads(Path(path).read_text()).items()} if os.path.exists(path) else {}
    model = difffit.load(os.path.join(run_dir, "delta.safetensors"))[0].eval()
    bf16 = models.bf16_chosen(args.precision, torch.device("cpu"))
    labels = list(range(model.num_classes)) * args.eval_per_class
    for name, steps in SAMPLERS:
        for seed in NOISE_SEEDS:
            if (name, steps, seed) in done:
                continue
            t0 = time.time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                x = sample.generate(model, sample.make_diffusion(name, str(steps)), labels, 4.0, seed=seed, sampler=name)
            m = train.toy_measure(sample.to_images(x), torch.tensor(labels), "toy")
            done[(name, steps, seed)] = dict(fd=m["frechet_distance"], acc=m["accuracy"], seconds=time.time() - t0, n=m["n"])
            print(f"{name} {steps} seed {seed}: FD {m['frechet_distance']:.2f} | accuracy {m['accuracy']:.0%} | {time.time() - t0:.1f} s", flush=True)
            with open(path, "w") as f:
                json.dump({json.dumps(k): v for k, v in done.items()}, f)
    return {(name, steps): [done[(name, steps, seed)] for seed in NOISE_SEEDS] for name, steps in SAMPLERS}

def collect(args, names):
    """{(data, flags as a tuple): [read_run of each seed, or None where the run failed]} for the cells of `names`."""
    results = {}
    for name in names:
        for _, data, flags in EXPERIMENTS[name]:
            key = (data, tuple(flags))
            if key in results:
                continue
            results[key] = []
            for seed in range(args.seeds):
                seed_dir = os.path.join(args.results_dir, "runs", cell_name(data, flags), f"seed{seed}")
                done = sorted(glob.glob(os.path.join(seed_dir, "*", "toy_ema.json")))
                results[key].append(read_run(os.path.dirname(done[-1])) if done else None)
    return results

# -----------------------------------------------------------------------------
# the tables: mean ± sd over seeds; a difference counts only if it is larger than twice its standard error

def stats(values):
    """(mean, sd, n) of the finite values; sd is 0 for one value."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)

def fmt(values, digits=2, pct=False):
    m, sd, n = stats(values)
    if n == 0:
        return "failed"
    k = 100 if pct else 1
    return f"{k * m:.{0 if pct else digits}f} ± {k * sd:.{0 if pct else digits}f}" + ("" if n == len(values) else f" ({n} of {len(values)})")

def beyond_noise(a, b):
    """Whether the means of two lists of values differ by more than 2 standard errors of the difference (Welch)."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    if min(na, nb) < 2:
        return False  # one seed: no noise estimate, no claim
    return abs(ma - mb) > 2 * math.sqrt(sa ** 2 / na + sb ** 2 / nb)

def versus(a, b):
    """'-1.23 (noise)' or '-1.23': the difference of means of a and b, and whether it is within seed noise."""
    d = stats(a)[0] - stats(b)[0]
    return f"{d:+.2f}" + ("" if beyond_noise(a, b) else " (noise)")

def field(runs, k):
    return [r[k] if r else None for r in runs]

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"

def write_tables(results, names, args):
    """Markdown for each experiment in `names`, from `results` (collect); returns {name: markdown}."""
    get = lambda data, flags: results[(data, tuple(flags))]
    n = args.seeds
    out = {}
    ref = {d: get(d, ["--method", "difffit"]) for d in TARGETS if (d, ("--method", "difffit")) in results}
    if "table1" in names:
        rows = []
        for label, data, flags in EXPERIMENTS["table1"]:
            if data != TARGETS[0]:
                continue
            cells = [get(d, flags) for d in TARGETS]
            first = next((r for c in cells for r in c if r), None)
            rows.append([label, f"{first['params']:,}" if first else "-", f"{first['delta_mb']:.2f}" if first else "-",
                         fmt(field(cells[0], "s_step"), 3)]
                        + [x for d, c in zip(TARGETS, cells) for x in (fmt(field(c, "fd")), "" if c is ref[d] else versus(field(c, "fd"), field(ref[d], "fd")),
                                                                       fmt(field(c, "acc"), pct=True))])
        rows.append(["base (no training)", "0", "-", "-"]
                    + [x for d in TARGETS for x in (fmt(field(ref[d], "base_fd")), "", fmt(field(ref[d], "base_acc"), pct=True))])
        out["table1"] = (f"Table 1 at toy scale: judge FD (lower is better) and class accuracy of the EMA after {args.max_steps} steps, "
                         f"mean ± sd over {n} seeds; 'vs DiffFit' is the difference of mean FD, '(noise)' where it is within 2 standard errors.\n\n"
                         + table(["method", "trained params", "delta MB", "s/step (toy)"]
                                 + [x for d in TARGETS for x in (f"FD {d}", "vs DiffFit", f"acc % {d}")], rows))
    for name, title, what in (("table4b", "Table 4b at toy scale: γ on these blocks of 8 (0 is the shallowest)", "blocks"),
                              ("table4d", f"Table 4d at toy scale: DiffFit's learning rate as a multiple of the base's pretraining lr ({BASE_LR:g})", "lr"),
                              ("posembed", "Table 3 at toy scale: the 32 px base on the 64 px target toy-64", "pos-embed"),
                              ("difftuning", "Diff-Tuning at toy scale, on `toy`", "method")):
        if name not in names:
            continue
        cells = [(label, get(d, flags)) for label, d, flags in EXPERIMENTS[name]]
        rows = []
        for i, (label, c) in enumerate(cells):
            j = VERSUS[name](i)  # the row this one is compared with
            rows.append([label, fmt(field(c, "fd")), "" if j == i else f"{versus(field(c, 'fd'), field(cells[j][1], 'fd'))} vs {cells[j][0]}",
                         fmt(field(c, "acc"), pct=True)])
        out[name] = (f"{title}: judge FD (lower is better) and class accuracy of the EMA after {args.max_steps} steps, mean ± sd over {n} seeds; "
                     "ΔFD is the difference of mean FD, '(noise)' where it is within 2 standard errors.\n\n"
                     + table([what, "FD", "ΔFD", "accuracy %"], rows))
    if "samplers" in names:
        sweep = results["samplers"]
        ref = [r["fd"] for r in sweep[("ddpm", 250)]]
        rows = [[name, steps, fmt([r["fd"] for r in runs]), "" if (name, steps) == ("ddpm", 250) else versus([r["fd"] for r in runs], ref),
                 fmt([r["acc"] for r in runs], pct=True), f"{statistics.mean(r['seconds'] for r in runs):.1f}"] for (name, steps), runs in sweep.items()]
        n_img = sweep[("ddpm", 250)][0]["n"]
        out["samplers"] = (f"Samplers at toy scale: the judge's FD and accuracy of {n_img} samples (CFG 4) of the DiffFit model "
                           f"(seed 0, {args.max_steps} steps) by each sampler and number of network calls per sample, "
                           f"mean ± sd over {len(sweep[('ddpm', 250)])} noise seeds; ΔFD vs DDPM-250, "
                           f"'(noise)' where it is within 2 standard errors. Seconds for the {n_img} samples on this machine.\n\n"
                           + table(["sampler", "network calls", "FD", "ΔFD vs ddpm 250", "accuracy %", "seconds"], rows))
    if "fig6" in names:
        cells = [(label, get(d, flags)) for label, d, flags in EXPERIMENTS["fig6"]]
        steps = sorted({s for _, c in cells for r in c if r for s in r["curve"]})
        rows = [[label] + [fmt([r["curve"].get(s, (None,))[0] if r else None for r in c]) for s in steps] for label, c in cells]
        out["fig6"] = (f"Fig. 6 at toy scale: judge FD on `toy` along training, mean ± sd over {n} seeds (step 0 is the base, except for "
                       f"VPT, whose random prompts change it before it trains).\n\n" + table(["method"] + [f"step {s}" for s in steps], rows))
    return out

# -----------------------------------------------------------------------------
# the plots (matplotlib, optional)

def plot_curves(path, title, cells):
    """FD vs step, one line per cell (mean over seeds, band ± sd)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, runs in cells:
        runs = [r for r in runs if r]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r["curve"]) for r in runs)))
        m = [stats([r["curve"][s][0] for r in runs]) for s in steps]
        ax.plot(steps, [x[0] for x in m], marker="o", label=label)
        ax.fill_between(steps, [x[0] - x[1] for x in m], [x[0] + x[1] for x in m], alpha=0.2)
    ax.set(xlabel="step", ylabel="judge FD (lower is better)", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

def write_plots(results, names, args):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files, no window
    except ImportError:
        print("matplotlib is not installed: the plots are skipped (pip install matplotlib)")
        return []
    get = lambda data, flags: results[(data, tuple(flags))]
    done = []
    if "fig6" in names:
        done.append(os.path.join(args.results_dir, "fig6.png"))
        plot_curves(done[-1], "DiffFit and the others on toy", [(label, get(d, f)) for label, d, f in EXPERIMENTS["fig6"]])
    if "posembed" in names:
        done.append(os.path.join(args.results_dir, "fig5.png"))
        plot_curves(done[-1], "32 px base -> toy-64", [(label, get(d, f)) for label, d, f in EXPERIMENTS["posembed"]])
    if "samplers" in names:
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for sampler in dict.fromkeys(name for name, _ in results["samplers"]):
            pts = [(steps, stats([r["fd"] for r in runs])) for (name, steps), runs in results["samplers"].items() if name == sampler]
            ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], [p[1][1] for p in pts], marker="o", capsize=3, label=sampler)
        ax.set(xlabel="network calls per sample", ylabel="judge FD (lower is better)", xscale="log", title="quality vs network calls (toy, DiffFit)")
        ax.legend()
        fig.tight_layout()
        done.append(os.path.join(args.results_dir, "samplers.png"))
        fig.savefig(done[-1])
        plt.close(fig)
    return done

# -----------------------------------------------------------------------------

def die(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)

parser.error = lambda msg: die(f"{msg} (see --help)")

def main(args):
    names = args.only.split(",") if args.only is not None else list(EXPERIMENTS)  # --only "" names nothing: refused, not all
    out = unwritable(args.results_dir)
    check_flags(args, [
        ("--only", all(n in EXPERIMENTS for n in names), f"comma-separated names of {', '.join(EXPERIMENTS)}"),
        ("--seeds", args.seeds >= 1, "use at least 1 seed (3 for the README's tables)"),
        ("--max-steps", args.max_steps >= 1, "train at least 1 step"),
        ("--eval-per-class", args.eval_per_class >= 1, "measure at least 1 sample per class"),
        ("--sample-steps", 2 <= args.sample_steps <= 1000, "SDE-DPM-Solver++ takes 2 .. 1000 steps"),
        ("--num-bank-samples", args.num_bank_samples >= 1, "use at least 1 sample"),
        ("--results-dir", out is None, f"{out}: pass a --results-dir you can write to"),
    ])
    # Its numbers compare only across runs made alike: a --results-dir keeps the settings it was started with.
    settings = dict(max_steps=args.max_steps, eval_per_class=args.eval_per_class, sample_steps=args.sample_steps, num_bank_samples=args.num_bank_samples,
                    precision="bf16" if models.bf16_chosen(args.precision, torch.device("cpu")) else "fp32")
    path = os.path.join(args.results_dir, "settings.json")
    if os.path.exists(path) and (old := json.loads(Path(path).read_text())) != settings:
        made = ", ".join(f"--{k.replace('_', '-')} {old.get(k)}" for k in sorted(settings.keys() | old.keys()) if old.get(k) != settings.get(k))
        raise ValueError(f"--results-dir {args.results_dir}: its runs were made with {made}: pass the same, or another --results-dir")
    if not os.path.exists(path) and os.path.isdir(os.path.join(args.results_dir, "runs")):
        print(f"{args.results_dir}: runs from before settings.json was kept; taking them as made with these settings", flush=True)
    os.makedirs(args.results_dir, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(settings).encode()))

    # Diff-Tuning's knowledge bank: samples of the base (its 40 source classes), once for every run that uses it.
    bank = os.path.join(args.results_dir, f"bank-{args.num_bank_samples}.npy")
    if "difftuning" in names and not os.path.exists(bank):
        sample.main(sample.parser.parse_args(["--ckpt", toy.BASE_PATH, "--num-bank-samples", str(args.num_bank_samples), "--sampler", "dpm++",
                                              "--steps", str(args.sample_steps), "--cfg-scale", "1.5", "--out", bank]))

    # The runs, cell by cell and seed by seed (cells shared by experiments run once).
    seen = set()
    for name in names:
        for _, data, flags in EXPERIMENTS[name]:
            if (data, tuple(flags)) not in seen:
                seen.add((data, tuple(flags)))
                for seed in range(args.seeds):
                    run_cell(args, data, flags, seed, bank)

    # The tables and plots, from the runs' files.
    results = collect(args, names)
    if "samplers" in names:
        run = next((r for r in results[("toy", tuple(DIFFFIT))] if r), None)
        if run is None:
            raise ValueError("samplers: the DiffFit run on toy failed, there is no model to sample")
        results["samplers"] = sampler_sweep(args, run["dir"])
    for name, md in write_tables(results, names, args).items():
        with open(os.path.join(args.results_dir, f"{name}.md"), "w") as f:
            f.write(md)
        print(f"\n{md}")
    for path in write_plots(results, names, args):
        print(f"wrote {path}")

if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        die(str(e))
