"""
study.py: the table code on made-up results, and a smoke run (2 steps, one seed) that writes every table and plot.

    python -m pytest tests/test_study.py
"""
import argparse
import json
import os

import pytest

import study

def fake_run(fd, acc=0.9, params=1000, curve=None):
    return dict(fd=fd, acc=acc, floor=0.1, base_fd=60.0, base_acc=0.1, curve=curve or {0: (60.0, 0.1), 10: (fd, acc)},
                params=params, delta_mb=0.01, s_step=0.25)

def fake_results(fds):
    """Every cell of every experiment with 3 seeds; fds maps (data, flags) to the seeds' FDs (default 10, 11, 12)."""
    results = {}
    for cells in study.EXPERIMENTS.values():
        for _, data, flags in cells:
            results[(data, tuple(flags))] = [fake_run(v) if v is not None else None for v in fds.get((data, tuple(flags)), (10, 11, 12))]
    results["samplers"] = {(name, steps): [dict(fd=8 + 100 / steps + seed, acc=1.0, seconds=steps / 10, n=128) for seed in (0, 1)]
                           for name, steps in study.SAMPLERS}
    return results

ARGS = argparse.Namespace(seeds=3, max_steps=10)

def test_stats_are_mean_and_sample_sd_of_the_seeds_that_finished():
    assert study.stats([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert study.stats([1.0, None, 3.0])[2] == 2
    assert study.fmt([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert study.fmt([1.0, None, 3.0]) == "2.00 ± 1.41 (2 of 3)"
    assert study.fmt([0.5, 1.0, 1.0], pct=True) == "83 ± 29"
    assert study.fmt([None, None]) == "failed"

def test_a_difference_counts_only_beyond_two_standard_errors():
    assert study.beyond_noise([10, 10.1, 9.9], [20, 20.1, 19.9])
    assert not study.beyond_noise([10, 14, 6], [12, 16, 8])  # 2 apart, se of the difference 3.3
    assert not study.beyond_noise([10], [20])  # one seed: no claim
    assert study.versus([10, 14, 6], [12, 16, 8]) == "-2.00 (noise)"
    assert study.versus([10, 10.1, 9.9], [20, 20.1, 19.9]) == "-10.00"

def test_tables_hold_every_cell_with_its_comparison():
    lora = ("toy", ("--method", "lora-r8"))
    high_lr = ("toy", ("--method", "difffit", "--lr", "0.02"))
    md = study.write_tables(fake_results({lora: (30, 31, 32), high_lr: (None, None, None)}), list(study.EXPERIMENTS), ARGS)
    assert set(md) == set(study.EXPERIMENTS)
    t1 = md["table1"].splitlines()
    assert len(t1) == 2 + 2 + len(study.difffit.METHODS) + 1 + 1  # title, blank, header, rule, methods, full at 1e-3, base
    lora_row = next(r for r in t1 if r.startswith("| lora-r8 |"))
    assert "| 31.00 ± 1.00 | +20.00 |" in lora_row  # 20 worse than DiffFit's 11 on toy, beyond noise
    assert "| 11.00 ± 1.00 | +0.00 (noise) |" in next(r for r in t1 if r.startswith("| bitfit |"))
    assert "| 20x | failed |" in md["table4d"]
    assert "| 0.1x | 11.00 ± 1.00 | +0.00 (noise) vs 1x |" in md["table4d"]
    assert "vs difffit |" in next(r for r in md["difftuning"].splitlines() if r.startswith("| difffit + Diff-Tuning"))
    assert md["fig6"].count("step 10") == 1 and "60.00 ± 0.00" in md["fig6"]
    assert "| dpm++ | 10 | 18.50 ± 0.71 | +9.60 | 100 ± 0 | 1.0 |" in md["samplers"]  # 18.5 vs 8.9: beyond noise
    assert "| ddpm | 100 | 9.50 ± 0.71 | +0.60 (noise) |" in md["samplers"]  # 2 se = 1.41

def test_cells_shared_by_experiments_are_one_run():
    names = {study.cell_name(d, f) for cells in study.EXPERIMENTS.values() for _, d, f in cells}
    keys = {(d, tuple(f)) for cells in study.EXPERIMENTS.values() for _, d, f in cells}
    assert len(names) == len(keys) < sum(len(c) for c in study.EXPERIMENTS.values())

def test_bad_experiment_name_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--only table9: comma-separated names of table1, "):
        study.main(study.parser.parse_args(["--only", "table9", "--results-dir", str(tmp_path)]))
    assert not os.listdir(tmp_path)

def test_smoke_study_writes_every_table_and_plot_and_is_not_redone(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(study, "SAMPLERS", [("ddpm", 250), ("sde-dpm++", 10)])  # the reference row and one other: the sweep's own
    monkeypatch.setattr(study, "NOISE_SEEDS", (0, 1))                          # length is sampling time, not code
    argv = ["--max-steps", "2", "--seeds", "1", "--eval-per-class", "1", "--sample-steps", "2", "--num-bank-samples", "4", "--results-dir", str(tmp_path)]
    study.main(study.parser.parse_args(argv))
    for name in list(study.EXPERIMENTS) + ["fig6.png", "fig5.png", "samplers.png"]:
        assert os.path.getsize(tmp_path / (name if name.endswith(".png") else f"{name}.md")) > 0, name
    assert "failed" not in (tmp_path / "table1.md").read_text()
    capsys.readouterr()
    study.main(study.parser.parse_args(argv + ["--only", "posembed"]))  # every run is done: nothing is trained again
    assert "=== " not in capsys.readouterr().out

def test_a_study_folder_is_continued_only_with_its_own_settings(tmp_path):
    made = dict(max_steps=200, eval_per_class=16, sample_steps=10, num_bank_samples=1024, precision="bf16")
    (tmp_path / "settings.json").write_text(json.dumps(made))  # a study begun with the defaults on a CPU with bf16
    with pytest.raises(ValueError, match="made with --max-steps 200, --precision bf16: pass the same"):
        study.main(study.parser.parse_args(["--max-steps", "2", "--precision", "fp32", "--only", "table1", "--results-dir", str(tmp_path)]))
    assert os.listdir(tmp_path) == ["settings.json"] and json.loads((tmp_path / "settings.json").read_text()) == made

def test_a_run_train_py_stops_is_recorded_as_failed(tmp_path):
    args = study.parser.parse_args(["--max-steps", "2", "--seeds", "1", "--eval-per-class", "1", "--sample-steps", "2", "--results-dir", str(tmp_path)])
    assert study.run_cell(args, "toy", ["--method", "bitfit", "--lr", "1e30"], 0, None) is None  # the loss goes to NaN
    assert os.path.exists(tmp_path / "runs" / "toy-method-bitfit-lr-1e30" / "seed0" / "failed")
    assert study.run_cell(args, "toy", ["--method", "bitfit", "--lr", "1e30"], 0, None) is None  # and is not retried

def test_every_run_names_the_measure_s_sampler_itself(tmp_path, monkeypatch):
    argvs = []
    monkeypatch.setattr(study.train.parser, "parse_args", lambda argv: argvs.append(argv))
    monkeypatch.setattr(study.train, "main", lambda args: None)
    args = study.parser.parse_args(["--sample-steps", "7", "--results-dir", str(tmp_path)])
    study.run_cell(args, "toy", ["--method", "bitfit"], 0, None)
    argv = argvs[0]  # not train.py's default, which may change: the study's FDs must compare across its runs
    assert argv[argv.index("--sampler") + 1] == study.MEASURE_SAMPLER and argv[argv.index("--sample-steps") + 1] == "7"
