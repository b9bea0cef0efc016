"""pytest: the repo's modules import from its root, wherever pytest is started (`pytest tests/test_models.py`, or from tests/)."""
import os
import sys

