"""
bench.py: its reference-style baseline computes what our training step computes, and the command prints its tables.

    python -m pytest tests/test_bench.py
"""
import pytest
import torch

import bench
import models
from models import DiT

@pytest.fixture
def tiny(monkeypatch):
    """bench.py's arguments for a 2-block DiT on 4x4 latents, batch 2, one round of one step."""
    monkeypatch.setitem(bench.DiT_models, "tiny", lambda **kw: DiT(depth=2, hidden_size=64, patch_size=2, num_heads=4, **kw))
    small = lambda dtype: (lambda *_: torch.randn(64, 64, dtype=dtype) @ torch.randn(64, 64, dtype=dtype), 2 * 64 ** 3)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: small(dtype))
    def make_args(*argv):
        args = bench.parser.parse_args(["--image-size", "32", "--batch-size", "2", "--num-classes", "5", "--iters", "1", "--rounds", "1", *argv])
        args.model = "tiny"
        return args
    return make_args

def randomize(model):
    """Random weights everywhere (a fresh DiT outputs 0 and its attention gets no gradient)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)

def test_reference_block_equals_ours():
    """DiT's unfused adaLN/gate/γ arithmetic computes what our fused block computes."""
    torch.manual_seed(0)
    ours = bench.models.DiTBlock(64, 4)
    randomize(ours)
    ours.gamma_attn, ours.gamma_mlp = (torch.nn.Parameter(torch.rand(64) + 0.5) for _ in range(2))
    ours.attn.gamma_qkv = torch.nn.Parameter(torch.rand(192) + 0.5)
    ref = bench.models.DiTBlock(64, 4)
    ref.gamma_attn, ref.gamma_mlp, ref.attn.gamma_qkv = ours.gamma_attn, ours.gamma_mlp, ours.attn.gamma_qkv
    ref.load_state_dict(ours.state_dict())
    ref.__class__ = bench.RefBlock
    x, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    assert torch.allclose(ref(x, c), ours(x, c), rtol=1e-5, atol=1e-6)

def test_reference_lookups_equal_ours():
    ours, ref = bench.diffusion_for("250", False), bench.diffusion_for("250", True)
    t = torch.tensor([0, 7, 249])
    x = torch.zeros(3, 4, 2, 2)
    for name in ["sqrt_alphas_cumprod", "posterior_log_variance_clipped", "log_betas", "posterior_mean_coef2"]:
        assert torch.equal(ref._at(name, t, x), ours._at(name, t, x))
    assert torch.equal(ref._on("timestep_map", t.device)[t], ours._on("timestep_map", t.device)[t])

@pytest.mark.parametrize("method", ["full", "difffit"])
def test_reference_step_computes_the_same_loss_and_gradients(tiny, method):
    cpu = torch.device("cpu")
    args = tiny()
    ours, ref = bench.trainer(method, cpu, args), bench.trainer(f"ref {method}", cpu, args)
    randomize(ours.model), randomize(ref.model)
    torch.manual_seed(2)
    loss = ours(optimize=False)  # the same t, noise and label dropout for both
    torch.manual_seed(2)
    ref_loss = ref(optimize=False)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    named_ref = dict(ref.model.named_parameters())
    for name, p in ours.model.named_parameters():
        assert p.requires_grad == named_ref[name].requires_grad, name
        if p.requires_grad:
            assert torch.allclose(p.grad, named_ref[name].grad, rtol=1e-4, atol=1e-6), name
        else:  # frozen weights get no gradient in either loop
            assert p.grad is None and named_ref[name].grad is None, name

def table(out):
    """The printed table as {row: [s/step, img/s, vs ref, vs full, TFLOP/s, % peak]} (no vs full when sampling)."""
    rows = {}
    for line in out.splitlines()[3:]:
        words = line.split()
        first = next(i for i, w in enumerate(words) if w.replace(".", "", 1).isdigit())  # the row name ends at the first number
        rows[" ".join(words[:first])] = words[first:]
    return rows

def test_training_table_rows_agree_with_their_step_times(tiny, capsys):
    bench.main(tiny("--methods", "full,difffit", "--precision", "fp32"))
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("--precision fp32: fp32 on cpu" + ("" if models.native_bf16(torch.device("cpu")) else " (no native bf16 here)"))
    rows = table(out)
    assert list(rows) == ["ref full", "ref difffit", "full", "difffit"]
    img_s = {row: float(r[1]) for row, r in rows.items()}  # the most digits of a row's time: batch 2 / (s/step)
    for row, r in rows.items():
        assert abs(2 / img_s[row] - float(r[0])) <= 6e-4, row  # s/step, printed to 1 ms
    for row, ref, full in [("full", "ref full", "full"), ("difffit", "ref difffit", "full")]:  # vs ref: the reference's time / ours
        assert float(rows[row][2].rstrip("x")) == pytest.approx(img_s[row] / img_s[ref], rel=2e-3, abs=6e-3), row
        assert float(rows[row][3]) == pytest.approx(img_s[full] / img_s[row], rel=2e-3, abs=6e-3), row  # vs full: ours / full's

@pytest.mark.parametrize("native", [True, False])
def test_sampling_table_has_a_row_per_sampler_and_precision(tiny, capsys, monkeypatch, native):
    monkeypatch.setattr(models, "native_bf16", lambda device: native)
    bench.main(tiny("--what", "sample", "--samplers", "ddpm3,sde-dpm++3", "--ref-steps", "3", "--precision", "both"))
    out, err = capsys.readouterr()
    assert ("warning: no native bf16" in err) == (not native)  # emulated bf16 rows can take hours: said before they start
    rows = table(out)
    assert list(rows) == ["ref sample", "sample ddpm3", "sample sde-dpm++3", "sample ddpm3 bf16", "sample sde-dpm++3 bf16"]
    assert rows["ref sample"][2] == "1.00x" and all(float(r[1]) > 0 and len(r) == 5 for r in rows.values())

def test_sampling_flops_count_the_cfg_batch_only_when_guided(tiny):
    """At --cfg-scale 1 neither loop doubles the batch (generate; DiT's sample_ddp.py), so the count halves."""
    guided, plain = (bench.sample_flops(tiny("--what", "sample", "--cfg-scale", c), "sample ddpm3") for c in ("4", "1"))
    assert plain > 0 and guided == 2 * plain

@pytest.mark.parametrize("row", ["difffit", "difffit bf16"])
def test_memory_child_runs_its_steps_then_reports_its_peak_in_bytes(tiny, capsys, monkeypatch, row):
    """A --what memory child: warm-up + timed steps of its one row, then its peak RSS (ru_maxrss is in KiB on Linux)."""
    import resource
    calls, trainer = [], bench.trainer
    def counting(*a):
        step = trainer(*a)
        return lambda *b: calls.append(1) or step(*b)
    monkeypatch.setattr(bench, "trainer", counting)
    bench.main(tiny("--child", row, "--warmup", "2", "--iters", "3"))
    peak = int(capsys.readouterr().out.split()[-1])
    assert len(calls) == 5
    assert 0.9 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def test_memory_table_runs_a_child_per_row_and_divides_their_peaks(tiny, capsys, monkeypatch):
    """--what memory: each row's peak from a `--child ROW` process of the same command, and the ratios of those peaks."""
    import sys
    from types import SimpleNamespace
    peaks = {"ref full": 4.0, "ref difffit": 3.0, "full": 4.5, "difffit": 1.5}  # GiB, as the children would print them in bytes
    def run(cmd, **kw):
        assert cmd[:2] == [sys.executable, bench.__file__] and cmd[-2] == "--child" and cmd[2:-2] == sys.argv[1:]
        return SimpleNamespace(returncode=0, stdout=f"noise\n{int(peaks[cmd[-1]] * 2**30)}\n", stderr="")
    monkeypatch.setattr(bench.subprocess, "run", run)
    bench.main(tiny("--what", "memory", "--methods", "full,difffit", "--precision", "fp32"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["row", "peak", "GB", "vs", "ref", "vs", "full"]
    rows = {" ".join(w[:-3]): w[-3:] for w in map(str.split, lines[2:])}
    assert rows == {"ref full": ["4.00", "1.00", "1.00"], "ref difffit": ["3.00", "1.00", "0.75"],
                    "full": ["4.50", "1.12", "1.00"], "difffit": ["1.50", "0.50", "0.33"]}
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=1, stdout="", stderr="MemoryError"))
    with pytest.raises(SystemExit, match="ref full failed:\nMemoryError"):  # a row that fails says which, with its error
        bench.main(tiny("--what", "memory", "--methods", "full,difffit", "--precision", "fp32"))

def test_training_table_in_bf16_on_any_cpu(tiny, capsys):
    """The rows every GPU runs: bf16 autocast with frozen weights stored in bf16, and their FLOP count (meta device)."""
    bench.main(tiny("--methods", "full,difffit", "--precision", "both"))
    out = capsys.readouterr().out
    rows = table(out)
    assert list(rows) == ["ref full", "ref difffit", "full", "difffit", "full bf16", "difffit bf16"]
    assert "TFLOP/s bf16" in out.splitlines()[1]
    assert float(rows["difffit bf16"][5].rstrip("%")) >= 0  # a rate was printed (a tiny model on a CPU without bf16 rounds to 0.000)
    flops = bench.train_flops("difffit bf16", tiny())  # counted on the meta device, where autocast does not run
    assert flops > 0 and flops == bench.train_flops("difffit", tiny())  # same work in either precision
