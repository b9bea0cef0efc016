"""
DiffFit surgery, deltas, merge, pos-embed trick and the paper's parameter accounting.

    python -m pytest tests/test_difffit.py
"""
import subprocess
import sys

import pytest
import torch

import difffit
from models import DiT, DiT_models

ROOT = __file__.rsplit("/tests/", 1)[0]

def tiny(seed=0, num_classes=10, input_size=8):
    """A small DiT with random (non-zero) weights, so every parameter matters to the output."""
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_classes=num_classes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model.eval()

def inputs(n=6, num_classes=10, input_size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, input_size, input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes + 1, (n,), generator=g)
    return x, t, y

def randomize_trained(model, seed=2, only=None):
    """Pretend training happened: move every trained tensor (γ included), or those named `only`, from its start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or any(o in name for o in only)):
                p.add_(0.1 * torch.randn(p.shape, generator=g))

def test_trainable_sets_are_exact():
    model = tiny()
    every = [n for n, _ in model.named_parameters()]
    table = ["y_embedder.embedding_table.weight"]
    biases = [n for n in every if n.endswith(".bias")]
    lora = [f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(4) for ab in "ab"]
    adapters = [f"blocks.{i}.mlp.adapter_{ud}.{wb}" for i in range(4) for ud in ("down", "up") for wb in ("weight", "bias")]
    expected = {
        "full": [n for n in every if n != "pos_embed"],
        "bitfit": biases + table,
        "difffit": biases + table + [f"blocks.{i}.{g}" for i in (0, 1) for g in ("gamma_attn", "gamma_mlp", "attn.gamma_qkv")] + ["final_layer.gamma"],
        "lora-r8": lora + table, "lora-r16": lora + table,
        "adapt-parallel": adapters + table, "adapt-sequential": adapters + table,
        "vpt-deep": [f"blocks.{i}.prompt" for i in range(4)] + [n for n in every if n.startswith("final_layer.")] + table,
    }
    assert sorted(expected) == sorted(difffit.METHODS)
    for method, names in expected.items():
        m = tiny()
        trained = difffit.apply(m, difffit.make_spec(m, method, 10))
        assert sorted(trained) == sorted(names), method
        assert sorted(trained) == sorted(n for n, p in m.named_parameters() if p.requires_grad)

def test_class_table_is_frozen_when_the_classes_are_the_bases():
    """ImageNet 256 -> ImageNet 512 (§4.3): "we do not need to fine-tune the label embedding"."""
    for method in difffit.METHODS:
        m = tiny()
        trained = difffit.apply(m, difffit.make_spec(m, method, 10, new_labels=False))
        assert ("y_embedder.embedding_table.weight" in trained) == (method == "full"), method

def test_every_method_but_vpt_starts_as_the_base():
    x, t, y = inputs()
    base = tiny()(x, t, y)
    for method in difffit.METHODS:
        m = tiny()
        difffit.apply(m, difffit.make_spec(m, method, 10, new_labels=False))
        randomize_trained(m, only=("lora_a", "adapter_down"))  # the halves that may start anywhere
        assert torch.equal(m(x, t, y), base) == (method != "vpt-deep"), method

@pytest.mark.parametrize("sequential", [False, True])
def test_adaptformer_adds_a_tenth_of_its_bottleneck_beside_or_after_the_mlp(sequential):
    mlp = tiny().blocks[0].mlp
    adapted = difffit.AdaptedMlp(mlp, 8, sequential)
    torch.nn.init.normal_(adapted.adapter_up.weight)  # the zero-initialised up-projection would hide the branch
    x = torch.randn(2, 5, 32)
    h = mlp(x)
    a = adapted.adapter_up(torch.relu(adapted.adapter_down(h if sequential else x)))
    torch.testing.assert_close(adapted(x), h + 0.1 * a)

def test_vpt_deep_prompts_each_of_the_first_blocks():
    m = tiny()
    difffit.apply(m, difffit.make_spec(m, "vpt-deep", 10, new_labels=False))
    x, t, y = inputs()
    out = m(x, t, y)
    assert out.shape == tiny()(x, t, y).shape  # the prompt tokens leave with their block
    out.square().sum().backward()
    for i in range(4):  # deep: every prompted block has its own token, and each one reaches the output
        assert m.blocks[i].prompt.shape == (1, 32) and m.blocks[i].prompt.grad.abs().sum() > 0

def test_gamma_placement_is_configurable():
    m = tiny()
    names = difffit.apply(m, difffit.make_spec(m, "difffit", 10, gamma_blocks=[3], gamma_qkv=False, gamma_final=False))
    gammas = sorted(n for n in names if "gamma" in n)
    assert gammas == ["blocks.3.gamma_attn", "blocks.3.gamma_mlp"]
    with pytest.raises(ValueError, match="out of range"):
        difffit.make_spec(m, "difffit", 10, gamma_blocks=[4])
    with pytest.raises(ValueError, match="unknown method"):
        difffit.make_spec(m, "lora-r3", 10)

def test_difffit_is_identity_at_init():
    base, model = tiny(), tiny()
    difffit.apply(model, difffit.make_spec(model, "difffit", 10, new_labels=False))
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), base(x, t, y))

def test_new_classes_start_as_the_pretrained_unconditional_model():
    base, model = tiny(), tiny()
    difffit.apply(model, difffit.make_spec(model, "difffit", num_classes=5))
    assert model.y_embedder.embedding_table.num_embeddings == 6 and model.num_classes == 5
    x, t, _ = inputs()
    y = torch.tensor([0, 1, 2, 3, 4, 5])  # 5 is the new null class
    null = torch.full_like(y, 10)  # the base's null class
    assert torch.equal(model(x, t, y), base(x, t, null))

CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_classes=10)  # tiny()'s

def test_delta_file_roundtrip_rebuilds_every_method(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "base.pt")  # a raw state dict: the delta carries the config
    for method in difffit.METHODS:
        model = tiny()
        spec = difffit.make_spec(model, method, 5)
        difffit.apply(model, spec)
        randomize_trained(model)
        params = {k: v for k, v in model.named_parameters() if v.requires_grad}
        path = str(tmp_path / f"{method}.safetensors")
        difffit.save_delta(path, difffit.make_delta(params, spec, CONFIG, difffit.base_ref(str(tmp_path / "base.pt"))))
        fresh, delta = difffit.load(path)
        assert delta["spec"] == spec and delta["config"] == CONFIG
        x, t, y = inputs(num_classes=5)
        assert torch.equal(fresh.eval()(x, t, y), model(x, t, y)), method

def test_deltas_of_earlier_versions_still_load(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "base.pt")
    model = tiny()
    spec = difffit.make_spec(model, "difffit", 5)
    difffit.apply(model, spec)
    randomize_trained(model)
    old_spec = {**{k: v for k, v in spec.items() if k != "fingerprint"}, "base": spec["fingerprint"]}  # the old key
    torch.save({"spec": old_spec, "params": difffit.trainable_state_dict(model), "config": CONFIG, "ckpt": str(tmp_path / "base.pt")},
               tmp_path / "delta.pt")
    fresh, _ = difffit.load(str(tmp_path / "delta.pt"))
    x, t, y = inputs(num_classes=5)
    assert torch.equal(fresh.eval()(x, t, y), model(x, t, y))

def test_a_delta_names_its_base_so_it_loads_from_anywhere(tmp_path, monkeypatch):
    assert difffit.base_ref("scratch") == "scratch" and difffit.base_ref("DiT-XL-2-256x256.pt") == "DiT-XL-2-256x256.pt"
    assert difffit.base_ref(f"{ROOT}/assets/toy_base.safetensors") == "assets/toy_base.safetensors"  # shipped: relative to the repo
    monkeypatch.chdir(tmp_path)
    assert difffit.base_ref("elsewhere.pt") == str(tmp_path / "elsewhere.pt")  # any other file: absolute
    torch.save(tiny().state_dict(), tmp_path / "base.pt")
    model = tiny()
    spec = difffit.make_spec(model, "bitfit", 5)
    difffit.apply(model, spec)
    delta = difffit.make_delta(difffit.trainable_state_dict(model), spec, CONFIG, difffit.base_ref("base.pt"))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    difffit.load(delta)  # found by its absolute path from another directory
    (tmp_path / "base.pt").rename(tmp_path / "moved.pt")
    with pytest.raises(FileNotFoundError, match="--base"):
        difffit.load(delta)
    difffit.load(delta, base=str(tmp_path / "moved.pt"))  # --base points it elsewhere

def test_delta_holds_only_trained_tensors():
    model = tiny()
    spec = difffit.make_spec(model, "difffit", 5)
    names = difffit.apply(model, spec)
    delta = difffit.make_delta(difffit.trainable_state_dict(model), spec, CONFIG, "scratch")
    assert sorted(delta["params"]) == sorted(names)
    assert sum(v.numel() for v in delta["params"].values()) < 0.1 * sum(p.numel() for p in model.parameters())

def test_delta_on_wrong_base_is_refused():
    model = tiny(seed=0)
    spec = difffit.make_spec(model, "difffit", 5)
    difffit.apply(model, spec)
    delta = difffit.make_delta(difffit.trainable_state_dict(model), spec, CONFIG, "scratch")
    with pytest.raises(ValueError, match="another base model"):
        difffit.apply_delta(tiny(seed=1), delta)

def test_a_delta_of_a_method_this_code_lacks_is_refused_by_name():
    model = tiny()
    spec = difffit.make_spec(model, "difffit", 5)
    difffit.apply(model, spec)
    delta = difffit.make_delta(difffit.trainable_state_dict(model), {**spec, "method": "gamma-only"}, CONFIG, "scratch")  # a fork's
    with pytest.raises(ValueError, match="the method 'gamma-only' is not one this difffit.py has .*: use the code that trained it"):
        difffit.apply_delta(tiny(), delta)

@pytest.mark.parametrize("method", ["difffit", "lora-r8"])
def test_merge_equals_unmerged(method):
    model = tiny()
    difffit.apply(model, difffit.make_spec(model, method, 5, gamma_blocks=[0, 2, 3]))
    randomize_trained(model)
    merged = difffit.merge(model)
    assert not any("gamma" in k or "lora" in k for k in merged)
    plain = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_classes=5).eval()
    plain.load_state_dict(merged, strict=True)  # the published layout: no DiffFit code needed
    x, t, y = inputs(num_classes=5)
    a, b = plain(x, t, y), model(x, t, y)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()

def test_methods_that_add_modules_refuse_to_merge():
    refused = set()
    for method in difffit.METHODS:
        model = tiny()
        difffit.apply(model, difffit.make_spec(model, method, 5))
        if not difffit.mergeable(model):
            refused.add(method)
            with pytest.raises(ValueError, match="cannot be merged"):
                difffit.merge(model)
    assert refused == {"adapt-parallel", "adapt-sequential", "vpt-deep"}

def test_pos_embed_trick_lines_up_with_the_base_grid():
    small, big = tiny(input_size=8), tiny(input_size=16)  # 4x4 and 8x8 patch grids
    difffit.interpolate_pos_embed(big, base_grid=4)
    table_big = big.pos_embed[0].reshape(8, 8, -1)
    table_small = small.pos_embed[0].reshape(4, 4, -1)
    torch.testing.assert_close(table_big[::2, ::2], table_small, rtol=0, atol=1e-6)
    assert not torch.allclose(table_big[1::2, 1::2], table_small)  # odd positions lie between them

def test_parameter_table_matches_the_paper():
    """DiT-XL/2 fine-tuned to 101 classes (Food-101), counted on the meta device."""
    counts = {}
    for method in difffit.METHODS:
        with torch.device("meta"):
            model = DiT_models["DiT-XL/2"]()
        counts[method] = sum(p.numel() for n in difffit.apply(model, difffit.make_spec(model, method, 101))
                             for p in [dict(model.named_parameters())[n]])
    table = 102 * 1152  # every method trains the new class table: 101 classes + the null row
    assert counts["full"] == 673_799_072  # the paper's 673.8M (pos_embed excluded)
    assert counts["bitfit"] == 607_136  # the paper's 0.61M: 489,632 biases + the class table
    # ours: BitFit + 14 blocks x (γ_attn 1152 + γ_mlp 1152 + γ_qkv 3456) + γ_final 32 (README explains vs 0.83M)
    assert counts["difffit"] == 607_136 + 14 * (1152 + 1152 + 3456) + 32
    assert counts["difffit"] * 4 < 4e6  # a delta of that size is ~2.75 MB of fp32, within the 4 MB budget
    for r in (8, 16):  # 1.15M and 2.18M: A (r x 1152) and B (3456 x r) on 28 qkv projections
        assert counts[f"lora-r{r}"] == 28 * r * (1152 + 3456) + table
    for mode in ("parallel", "sequential"):  # 4.28M: 28 bottlenecks 1152 -> 64 -> 1152 with biases
        assert counts[f"adapt-{mode}"] == 28 * (1152 * 64 + 64 + 64 * 1152 + 1152) + table == 4_280_320
    # 2.81M: 5 prompt tokens + the final layer (adaLN 1152 -> 2304, linear 1152 -> 2*2*8) + the class table
    assert counts["vpt-deep"] == 5 * 1152 + (1152 * 2304 + 2304) + (1152 * 32 + 32) + table == 2_816_672

def test_parameter_table_command_prints_the_counts():
    out = subprocess.run([sys.executable, "difffit.py", "--model", "DiT-XL/2", "--num-classes", "101"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for count in ("673,799,072", "607,136", "687,808", "1,149,696", "2,181,888", "4,280,320", "2,816,672"):
        assert count in out

def test_256_to_512_transfer_replays_through_a_delta(tmp_path):
    """A base trained on a 4x4 grid, fine-tuned at 8x8 with the pos-embed trick; the delta rebuilds it exactly."""
    from models import load_model
    torch.save(tiny(input_size=8).state_dict(), tmp_path / "base.pt")
    model, config, base_grid = load_model(str(tmp_path / "base.pt"), CONFIG, input_size=16)
    assert base_grid == 4 and config["input_size"] == 16
    spec = difffit.make_spec(model, "difffit", 5, base_grid=base_grid)
    difffit.apply(model, spec)
    table = model.pos_embed[0].reshape(8, 8, -1)
    torch.testing.assert_close(table[::2, ::2], tiny(input_size=8).pos_embed[0].reshape(4, 4, -1), rtol=0, atol=1e-6)
    randomize_trained(model)
    again, _ = difffit.load(difffit.make_delta(difffit.trainable_state_dict(model), spec, config, str(tmp_path / "base.pt")))
    x, t, y = inputs(num_classes=5, input_size=16)
    assert torch.equal(again.eval()(x, t, y), model.eval()(x, t, y))

def test_diff_tuning_timesteps_follow_their_distributions():
    import train
    """A chi-square test over 10 bins of 100 steps: downstream P(t) ∝ (t + 1)^τ, bank P(t) ∝ (T − t)^τ."""
    from scipy.stats import chisquare
    T, n = 1000, 200_000
    torch.manual_seed(0)
    for tau in (1.0, 0.5):
        for towards, weight in (("noise", lambda t: (t + 1) ** tau), ("data", lambda t: (T - t) ** tau)):
            t = train.sample_timesteps(n, T, tau, towards)
            assert t.min() >= 0 and t.max() < T
            p = weight(torch.arange(T, dtype=torch.float64))
            expected = (p / p.sum()).reshape(10, 100).sum(1) * n
            observed = torch.bincount(t // 100, minlength=10).double()
            assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3, (tau, towards)
    # and the test can tell the two directions apart
    t = train.sample_timesteps(n, T, 1.0, "noise")
    assert abs(t.double().mean().item() - 666) < 3  # E[t] = 665.67 for P ∝ t + 1
    # a large τ: 1000^13 overflows float32, so the weights are (t + 1)^τ / T^τ in float64, at most 1
    for tau in (13.0, 400.0):
        log_p = tau * torch.arange(1, T + 1, dtype=torch.float64).log()  # log (t + 1)^τ
        mean = (torch.arange(T) * (log_p - log_p.max()).exp()).sum().item() / (log_p - log_p.max()).exp().sum().item()
        noise, data = train.sample_timesteps(n, T, tau, "noise"), train.sample_timesteps(n, T, tau, "data")
        assert abs(noise.double().mean().item() - mean) < 1 and abs(data.double().mean().item() - (T - 1 - mean)) < 1, tau

def test_tau_zero_is_plain_training_uniform_draw():
    import train
    torch.manual_seed(3)
    a = train.sample_timesteps(64, 1000, 0.0, "data")
    torch.manual_seed(3)
    assert torch.equal(a, torch.randint(0, 1000, (64,)))
