"""
The DiT of models.py against the reference: golden vectors, checkpoint layout, parameter counts, init, γ slots, CFG.

    python -m pytest tests/test_models.py
"""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT
from models import DiT, DiT_models, gelu_tanh, get_2d_sincos_pos_embed, load_dit_state_dict, timestep_embedding

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(GOLDEN, "dit_tiny.pt"), weights_only=True)

def tiny(golden, **overrides):
    """The golden tiny DiT (input 8, D 64, depth 3, 10 classes) with its random N(0, 0.05²) weights, eval mode."""
    model = DiT(**{**golden["config"], **overrides})
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.eval()

def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

def switch_on_gammas(model, value=1.0):
    """What difffit.py does: fill every γ slot with a Parameter."""
    D = model.hidden_size
    for block in model.blocks:
        block.gamma_attn = nn.Parameter(torch.full((D,), value))
        block.gamma_mlp = nn.Parameter(torch.full((D,), value))
        block.attn.gamma_qkv = nn.Parameter(torch.full((3 * D,), value))
    model.final_layer.gamma = nn.Parameter(torch.full((model.final_layer.linear.out_features,), value))
    return model

# -----------------------------------------------------------------------------
# reference equivalence (golden vectors made with facebookresearch/DiT, fp32, CPU)

@torch.no_grad()
def test_forward_matches_reference(golden):
    out = tiny(golden)(golden["x"], golden["t"], golden["y"])
    assert rel_err(out, golden["out"]) < 1e-5  # SDPA vs the reference's manual attention: rounding only
    assert torch.allclose(out, golden["out"], rtol=1e-5, atol=1e-6)

@torch.no_grad()
def test_forward_with_cfg_matches_reference(golden):
    g = golden
    out = tiny(g).forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], g["cfg_scale"])  # default: 3 guided channels
    assert rel_err(out, g["out_cfg"]) < 1e-5
    assert torch.allclose(out, g["out_cfg"], rtol=1e-5, atol=1e-6)

def test_timestep_embedding_matches_reference(golden):
    t, ref = golden["timestep_embedding_t"], golden["timestep_embedding_256"]
    emb = timestep_embedding(t)
    assert emb.shape == (len(t), 256)
    # at t = 999 the fp32 argument t·ω itself has an ulp of 6e-5, so exp/cos rounding differences between
    # CPUs show up at that scale; small t must agree to float32 precision
    assert torch.allclose(emb, ref, rtol=0, atol=1e-4)
    assert torch.allclose(emb[:3], ref[:3], rtol=0, atol=1e-6)

@pytest.mark.parametrize("key,dim,grid", [("pos_embed_64_grid4", 64, 4), ("pos_embed_64_grid8", 64, 8), ("pos_embed_96_grid6", 96, 6)])
def test_pos_embed_matches_reference(golden, key, dim, grid):
    table = get_2d_sincos_pos_embed(dim, grid)
    assert table.dtype == torch.float32 and table.shape == (grid * grid, dim)
    assert torch.allclose(table, golden[key], rtol=0, atol=1e-7)  # float64 then cast: equal up to an fp32 ulp

def test_golden_state_dict_loads_strict_and_fresh_pos_embed_equals_it(golden):
    model = DiT(**golden["config"])
    assert set(model.state_dict()) == set(golden["state_dict"])
    assert torch.allclose(model.pos_embed, golden["state_dict"]["pos_embed"], rtol=0, atol=1e-7)
    load_dit_state_dict(model, golden["state_dict"], "tiny")

# -----------------------------------------------------------------------------
# the published checkpoints' layout and the paper's sizes (all on the meta device: no memory)

@pytest.mark.parametrize("key,input_size", [("DiT-XL/2@256", 32), ("DiT-XL/2@512", 64)])
def test_xl2_checkpoint_layout_loads_strict(key, input_size):
    manifest = json.load(open(os.path.join(GOLDEN, "dit_xl2_state_dict_manifest.json")))[key]
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=input_size)
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
    assert len(state_dict) == 292
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest
    model.load_state_dict(state_dict, strict=True, assign=True)
    load_dit_state_dict(model, state_dict, "DiT-XL/2")
    assert isinstance(model.pos_embed, nn.Parameter) and not model.pos_embed.requires_grad

@pytest.mark.parametrize("name,input_size,count", [
    ("DiT-XL/2", 32, 675_129_632), ("DiT-XL/2", 64, 676_014_368), ("DiT-L/2", 32, 458_102_816),
    ("DiT-B/2", 32, 130_512_416), ("DiT-B/4", 32, 130_475_648), ("DiT-S/2", 32, 32_963_360), ("DiT-S/8", 32, 33_148_160)])
def test_parameter_counts_match_dit(name, input_size, count):
    with torch.device("meta"):
        model = DiT_models[name](input_size=input_size)
    assert sum(p.numel() for p in model.parameters()) == count  # pos_embed included: it is a Parameter

def test_all_twelve_presets_take_the_common_options():
    assert len(DiT_models) == 12 and "DiT-XL/2" in DiT_models and "DiT-S/8" in DiT_models
    for name, make in DiT_models.items():
        with torch.device("meta"):
            model = make(input_size=16, num_classes=5, in_channels=3, learn_sigma=False, class_dropout_prob=0.0)
        p = int(name.split("/")[1])
        assert (model.input_size, model.patch_size, model.in_channels, model.out_channels, model.num_classes) == (16, p, 3, 3, 5)
        assert model.y_embedder.embedding_table.num_embeddings == 5  # no null row without label dropout
        assert model.pos_embed.shape == (1, (16 // p) ** 2, model.hidden_size)
        assert len(model.blocks) == model.depth and model.hidden_size % model.num_heads == 0

# -----------------------------------------------------------------------------
# init and label dropout

@torch.no_grad()
def test_fresh_dit_outputs_exactly_zero(golden):
    torch.manual_seed(0)
    model = DiT(**golden["config"])  # adaLN-Zero: zero modulations and a zero output layer
    for mode in (model.train, model.eval):
        mode()
        assert torch.equal(model(golden["x"], golden["t"], golden["y"]), torch.zeros(4, 8, 8, 8))

@torch.no_grad()
def test_label_dropout_only_in_train_mode(golden):
    model = tiny(golden, class_dropout_prob=1.0)  # same table size (11 rows) as the golden model
    x, t, y = golden["x"], golden["t"], torch.tensor([0, 3, 9, 1])
    null = torch.full_like(y, model.num_classes)
    unconditional = model(x, t, null)
    conditional = model(x, t, y)
    assert not torch.equal(conditional, unconditional)
    model.train()
    assert torch.equal(model(x, t, y), unconditional)  # every label became the null class

def test_labels_are_dropped_one_time_in_ten_in_training():
    embedder = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=8, depth=1, num_heads=1, num_classes=3).y_embedder
    assert embedder.dropout_prob == 0.1  # DiT's class_dropout_prob, what its CFG was trained with
    torch.manual_seed(0)
    table = embedder.embedding_table.weight
    dropped = (embedder(torch.zeros(20000, dtype=torch.long)) == table[3]).all(1).float().mean().item()
    assert abs(dropped - 0.1) < 0.01  # 0.1 ± 4.7 standard errors

# -----------------------------------------------------------------------------
# DiffFit's γ slots

@torch.no_grad()
def test_gammas_absent_or_ones_are_bit_identical(golden):
    model = tiny(golden)
    plain = model(golden["x"], golden["t"], golden["y"])
    plain_cfg = model.forward_with_cfg(golden["cfg_x"], golden["cfg_t"], golden["cfg_y"], 4.0)
    switch_on_gammas(model, 1.0)
    assert torch.equal(model(golden["x"], golden["t"], golden["y"]), plain)
    assert torch.equal(model.forward_with_cfg(golden["cfg_x"], golden["cfg_t"], golden["cfg_y"], 4.0), plain_cfg)

@pytest.mark.parametrize("slot", ["gamma_attn", "gamma_mlp", "attn.gamma_qkv", "final_layer.gamma"])
@torch.no_grad()
def test_each_gamma_changes_the_output(golden, slot):
    model = tiny(golden)
    plain = model(golden["x"], golden["t"], golden["y"])
    owner = model.final_layer if slot == "final_layer.gamma" else model.blocks[0].attn if slot == "attn.gamma_qkv" else model.blocks[0]
    name = slot.split(".")[-1]
    n = owner.linear.out_features if owner is model.final_layer else 3 * model.hidden_size if owner is model.blocks[0].attn else model.hidden_size
    setattr(owner, name, nn.Parameter(torch.full((n,), 1.5)))
    assert not torch.allclose(model(golden["x"], golden["t"], golden["y"]), plain, atol=1e-4)

def test_gammas_enter_state_dict_only_when_switched_on(golden):
    model = tiny(golden)
    assert not any("gamma" in k for k in model.state_dict())
    assert model.blocks[0].gamma_attn is None and model.blocks[0].attn.gamma_qkv is None and model.final_layer.gamma is None
    switch_on_gammas(model)
    gammas = sorted(k for k in model.state_dict() if "gamma" in k)
    assert len(gammas) == 3 * model.depth + 1 and "blocks.0.attn.gamma_qkv" in gammas and "final_layer.gamma" in gammas
    assert sum(1 for n, _ in model.named_parameters() if "gamma" in n) == len(gammas)

@torch.no_grad()
def test_compile_and_bf16_autocast_work_with_gammas(golden):
    model = switch_on_gammas(tiny(golden), 1.0)
    args = golden["x"], golden["t"], golden["y"]
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: no graph breaks
    assert rel_err(compiled(*args), golden["out"]) < 1e-6  # compiled, GELU is written with a sigmoid: other rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args)
    assert out.dtype == torch.float32 and rel_err(out, golden["out"]) < 3e-2  # bf16 inside, the output in fp32 for the sampler

def test_compiled_gelu_is_the_tanh_gelu_in_value_and_gradient():
    x64 = torch.linspace(-10, 10, 8001, dtype=torch.float64).requires_grad_()
    ref = F.gelu(x64, approximate="tanh")
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    x = x64.detach().float().requires_grad_()
    y = torch.compile(gelu_tanh, fullgraph=True, backend="eager")(x)  # the form torch.compile traces
    y.sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0, atol=4e-6)  # eager fp32: 1e-6 off
    x16 = x.detach().bfloat16()
    y16 = torch.compile(gelu_tanh, fullgraph=True, backend="eager")(x16)
    assert y16.dtype == torch.bfloat16  # computed in fp32, rounded once: within one bf16 step of the exact value
    torch.testing.assert_close(y16.double(), F.gelu(x16.double(), approximate="tanh"), rtol=2 ** -8, atol=1e-6)

# -----------------------------------------------------------------------------
# position-table trick and classifier-free guidance

def test_pos_embed_trick_lines_up_with_the_smaller_grid():
    D, G = 64, 4
    small = get_2d_sincos_pos_embed(D, G).view(G, G, D)
    large = get_2d_sincos_pos_embed(D, 2 * G, scale=2).view(2 * G, 2 * G, D)
    assert torch.equal(large[::2, ::2], small)
    assert not torch.equal(get_2d_sincos_pos_embed(D, 2 * G).view(2 * G, 2 * G, D)[::2, ::2], small)

def test_pos_embed_puts_the_column_coordinate_first():
    D, G = 64, 4
    table = get_2d_sincos_pos_embed(D, G).view(G, G, D)  # (row, col, D)
    assert torch.equal(table[0, :, : D // 2], table[3, :, : D // 2])  # first half depends on the column only
    assert torch.equal(table[:, 0, D // 2 :], table[:, 3, D // 2 :])  # second half on the row only
    assert torch.equal(table[0, 0], torch.cat([torch.zeros(D // 4), torch.ones(D // 4)] * 2))  # sin then cos

@torch.no_grad()
def test_guide_channels_none_guides_only_the_remaining_eps_channel(golden):
    model, g = tiny(golden), golden
    three = model.forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], 4.0, guide_channels=3)
    every = model.forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], 4.0, guide_channels=None)
    assert torch.equal(three[:, :3], every[:, :3])  # guided the same way
    assert not torch.allclose(three[:, 3], every[:, 3], atol=1e-3)  # ε channel 3: conditional vs guided
    assert torch.equal(three[:, 4:], every[:, 4:])  # variance channels: never guided
    for out, k in ((three, 3), (every, 4)):
        assert torch.equal(out[:2, :k], out[2:, :k])  # both halves carry the same guided ε

@torch.no_grad()
def test_cfg_scale_one_is_the_conditional_forward(golden):
    model, g = tiny(golden), golden
    out = model.forward_with_cfg(g["cfg_x"], g["cfg_t"], g["cfg_y"], 1.0)
    cond = model(g["cfg_x"][:2], g["cfg_t"][:2], g["cfg_y"][:2])
    assert torch.allclose(out[:2, :3], cond[:, :3], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out[:2, 3:], cond[:, 3:], rtol=1e-5, atol=1e-6)  # the unguided channels are the conditional pass

# -----------------------------------------------------------------------------
# bad input

def test_bad_inputs_raise_readable_errors(golden):
    model, x, t, y = tiny(golden), golden["x"], golden["t"], golden["y"]
    with pytest.raises(ValueError, match=r"takes x of shape \(N, 4, 8, 8\), got \(4, 3, 8, 8\)"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match=r"got \(4, 4, 16, 16\).*input_size=H"):
        model(torch.randn(4, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiT(input_size=9, patch_size=2, hidden_size=64, depth=1, num_heads=4)

def test_mismatched_checkpoint_raises_one_readable_line(golden):
    sd = dict(golden["state_dict"])
    del sd["pos_embed"]
    sd["foo"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_dit_state_dict(DiT(**golden["config"]), sd, "DiT-tiny")
    msg = str(e.value)
    assert "\n" not in msg and "DiT-tiny at 8x8 latents" in msg and "missing pos_embed" in msg and "unexpected foo" in msg
    with pytest.raises(ValueError, match=r"shape pos_embed checkpoint \(1, 16, 64\) vs model \(1, 16, 32\).*\(\+38 more\).*--model"):
        load_dit_state_dict(DiT(**{**golden["config"], "hidden_size": 32}), golden["state_dict"], "DiT-tiny")

# -----------------------------------------------------------------------------
# loading: published files, this repo's checkpoints, another resolution, pickled code

def test_published_file_hash_is_recorded_then_enforced(tmp_path, monkeypatch):
    import http.server, threading
    import files
    payload = {"body": b"weights v1" * 1000}
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload["body"])))
            self.end_headers()
            self.wfile.write(payload["body"])
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/w.pt"
        monkeypatch.setattr(files, "PRETRAINED", {"w.pt": (url, None)})
        monkeypatch.setattr(files, "PRETRAINED_DIR", str(tmp_path))
        path = files.pretrained_file("w.pt")  # first download: the hash is recorded beside it
        assert open(path, "rb").read() == payload["body"] and (tmp_path / "w.pt.sha256").exists()
        os.remove(path)
        payload["body"] = b"tampered!!" * 1000  # the server now serves other bytes: refused, nothing kept
        with pytest.raises(ValueError, match="is not the expected"):
            files.pretrained_file("w.pt")
        assert sorted(os.listdir(tmp_path)) == ["w.pt.sha256"]
    finally:
        httpd.shutdown()
        httpd.server_close()

def test_under_torchrun_one_process_per_node_downloads(tmp_path):
    """Local rank 1 waits for the file local rank 0 downloads: one request, not one per GPU (8x the bytes, and rate limits)."""
    import http.server, subprocess, sys, threading
    requests = []
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "6000")
            self.end_headers()
            self.wfile.write(b"weight" * 1000)
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    code = (f"import files; files.PRETRAINED['w.pt'] = ('http://127.0.0.1:{httpd.server_address[1]}/w.pt', None); "
            "print(open(files.pretrained_file('w.pt'), 'rb').read() == b'weight' * 1000)")
    run = lambda rank: subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "LOCAL_RANK": str(rank), "DIFFFIT_PRETRAINED": str(tmp_path)})
    try:
        waiting = run(1)
        assert "waiting for local rank 0" in waiting.stdout.readline()  # started first, it does not download
        first = run(0)
        outs = [p.communicate(timeout=120)[0] for p in (first, waiting)]
        assert [p.returncode for p in (first, waiting)] == [0, 0] and all(o.strip().endswith("True") for o in outs), outs
        assert requests == ["/w.pt"]
    finally:
        httpd.shutdown()
        httpd.server_close()

def test_checkpoint_with_pickled_code_is_refused_not_run(tmp_path):
    import models
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: refused.*GLOBAL posix.system"):
        models.load_model(str(tmp_path / "evil.pt"), dict(model="DiT-S/8"))
    assert not (tmp_path / "pwned").exists()

def test_a_lower_resolution_base_loads_for_a_larger_model(golden, tmp_path):
    import models
    torch.save(golden["state_dict"], tmp_path / "raw.pt")  # a raw state dict, as DiT publishes them (8x8 input, 4x4 grid)
    model, config, base_grid = models.load_model(str(tmp_path / "raw.pt"), golden["config"], input_size=16)
    assert base_grid == 4 and model.input_size == config["input_size"] == 16
    for k, v in golden["state_dict"].items():
        if k != "pos_embed":
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="does not fit"):  # other shapes must still fit
        models.load_model(str(tmp_path / "raw.pt"), {**golden["config"], "hidden_size": 32}, input_size=16)
