"""Shared fixtures: the zoo, one representative model per architecture family, and strategies."""

from __future__ import annotations

import os

import matplotlib
import pytest
from hypothesis import settings

# CI replays the same examples every run (reproducible, never flaky); local runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

matplotlib.use("Agg")
# Parallel workers (make test runs two, on two cores) each get one compute thread, and so do the notebook kernels
# and JupyterLab servers they start (they inherit the variable): two threads per worker made OpenMP threads spin
# against the other worker's, an SVD of 128 x 256 took 1.6 s instead of 10 ms, and the suite's CPU time doubled.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One model per architecture family: where peft parity and real-tensor checks run.
REPRESENTATIVES = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "roberta-base", "opt-350m",
                   "bloom-560m", "qwen2.5-0.5b", "llama-2-7b"]
TINY = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)  # in case torch was imported before the variable above was set
    torch.manual_seed(0)
    yield
