"""
files.py: the safetensors writer and reader against the safetensors package, and one clear line for a damaged file.
(The checked loaders' refusals are in tests/test_errors.py, downloads in tests/test_models.py and tests/test_fid.py.)

    python -m pytest tests/test_files.py
"""
import os
import re

import pytest
import torch

import files
from files import read_safetensors, write_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

def test_safetensors_reader_matches_safetensors_package(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, 1, 1, generator=g).bfloat16(), "f64": torch.randn(1, generator=g).double(),
               "i64": torch.arange(5), "i8": torch.arange(-3, 4, dtype=torch.int8), "bool": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "t.safetensors")
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    (ours, meta), theirs = read_safetensors(path), safetensors_torch.load_file(path)
    assert meta == {"format": "pt"}
    assert ours.keys() == theirs.keys() == tensors.keys()
    for k in tensors:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k])

def test_safetensors_writer_is_read_by_the_safetensors_package(tmp_path):
    g = torch.Generator().manual_seed(6)
    tensors = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).bfloat16(), "i": torch.arange(3),
               "h": torch.randn(2, 2, generator=g).half(), "s": torch.tensor(1.5), "e": torch.zeros(0, 2), "t": torch.randn(3, 4).t()}
    path = str(tmp_path / "w.safetensors")
    write_safetensors(path, tensors, {"spec": '{"method": "difffit"}'})
    theirs = safetensors_torch.load_file(path)
    assert theirs.keys() == tensors.keys()
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and torch.equal(theirs[k], v)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"spec": '{"method": "difffit"}'}
    assert read_safetensors(path)[1] == {"spec": '{"method": "difffit"}'}
    assert not os.path.exists(path + ".tmp")

@pytest.mark.parametrize("damage, needle", [
    (lambda b: b[:-5], "truncated"),                          # a payload cut short
    (lambda b: b[:4], "not a safetensors file"),             # cut inside the size field
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "not a safetensors file"),  # a header size larger than the file
    (lambda b: b[:8] + b"[" + b[9:], "unreadable header"),  # broken JSON
    (lambda b: b.replace(b'"shape":[4,3]', b'"shape":[4,4]'), "inconsistent"),  # a shape that lies about the bytes
    (lambda b: b"PK\x03\x04" + b[4:], "not a safetensors file"),  # a zip (torch .pt) is not safetensors
])
def test_damaged_safetensors_give_one_clear_error(tmp_path, damage, needle):
    path = str(tmp_path / "d.safetensors")
    write_safetensors(path, {"w": torch.randn(4, 3), "b": torch.randn(3)})
    with open(path, "rb") as f:
        data = damage(f.read())
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=needle) as e:
        read_safetensors(path)
    assert path in str(e.value) and "\n" not in str(e.value)

@pytest.mark.parametrize("rank, world, local, bad", [("0", "0", "0", "RANK=0 with WORLD_SIZE=0"), ("3", "2", "0", "RANK=3 with WORLD_SIZE=2"),
                                                     ("abc", "1", "0", "RANK=abc"), ("0", "2", "1", "RANK=0 with WORLD_SIZE=2, LOCAL_RANK=1"),
                                                     ("1", "x", "0", "WORLD_SIZE=x"), ("1", "2", "1", None)])
def test_torchrun_variables_that_cannot_be_a_launch_are_one_line_not_a_hang(monkeypatch, rank, world, local, bad):
    """RANK >= WORLD_SIZE would wait for ranks that never come (and ignore SIGTERM while it waits); WORLD_SIZE=0 divides by 0."""
    for k, v in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    if bad is None:
        assert files.launched_by_torchrun()
    else:
        with pytest.raises(ValueError, match=f"^{re.escape(bad)}.*torchrun sets 0 <= LOCAL_RANK <= RANK < WORLD_SIZE"):
            files.launched_by_torchrun()
