"""pytest: the repo's modules import from its root, wherever pytest is started (`pytest tests/test_models.py`, or from tests/),
and the tiny base model that the end-to-end tests of train.py, sample.py and the error tests share."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models import DiT, save_model  # noqa: E402 (after the path is set)

TINY = dict(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=8)

@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny pixel-space base checkpoint (TINY, the toy's 8 classes) in this repo's format, with random non-zero weights;
    one file for the whole session, which no test may change."""
    torch.manual_seed(0)
    model = DiT(**TINY)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.05)
    path = str(tmp_path_factory.mktemp("base") / "base.safetensors")
    save_model(path, model.state_dict(), TINY)
    return path
