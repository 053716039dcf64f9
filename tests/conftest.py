"""Shared fixtures: the zoo, one representative model per architecture family, and strategies."""

from __future__ import annotations

import os

import matplotlib
import pytest
from hypothesis import settings

from survey_utils.zoo import list_models

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

# Zoo configs the per-method matrices (tests/methods/test_matrix.py, test_hybrid.py, test_hybrid_unified.py) leave
# out, each with the walked config that stands for it: the smallest of the zoo configs with the same structure. Same
# structure means (test_matrix.py::test_each_config_left_out_has_its_twin_in_the_matrix checks each pair): the same
# transformers class, the same modules by name (layer index aside), kind, parameters, tying and mixture-of-experts
# part, each linear's in and out features equal to the same named sizes (hidden, heads x head_dim, kv heads x
# head_dim, intermediate, vocabulary; so grouped-query attention, T5-3B's wide attention or tied embeddings make a
# config its own), and the same registered methods applying. The code a method runs in apply and in its closed form
# is then the same; what differs is sizes, which the layout reads from the config. They are still counted exactly:
# tests/test_zoo.py (total against the published one), tests/test_generic_layout.py and tests/test_snapshots.py
# (layout against the meta build, module by module), tests/test_architecture.py (names and shapes).
# Cost: building each on meta once per registered method. Issue 12's six added configs took 288 cases and 45 s of CPU;
# the twelve big ones added to this map later (the 70B, 72B, 405B, 11B, 65B configs among them) took 190 s of the
# matrix's 470 s under make test's load.
SAME_FAMILY_AS = {
    "llama-2-13b": "llama-2-7b",
    "llama-65b": "llama-2-7b",
    "llama-2-70b": "llama-3-8b",  # grouped-query attention, untied
    "llama-3-70b": "llama-3-8b",
    "llama-3.1-405b": "llama-3-8b",
    "llama-3.2-3b": "llama-3.2-1b",  # grouped-query attention, tied embeddings
    "qwen2.5-72b": "qwen2.5-7b",
    "gemma-2-9b": "gemma-2-2b",
    "mixtral-8x7b": "tiny-mixtral",
    "gpt2-medium": "gpt2",
    "gpt2-large": "gpt2",
    "roberta-large": "roberta-base",
    "t5-base": "t5-small",
    "t5-large": "t5-small",
    "t5-11b": "t5-3b",  # attention inner width (heads x d_kv) wider than d_model
    "mt0-large": "mt5-base",
    "bloom-7b1": "bloom-560m",
    "gpt-neox-20b": "pythia-1b",
}
MATRIX_MODELS = [m for m in list_models() if m not in SAME_FAMILY_AS]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make ``--dist loadgroup`` group by ``xdist_group`` again (``make test`` relies on it).

    pytest-xdist 3.8 groups a test by appending ``@group`` to ``item._nodeid`` on the worker; pytest 9.2 keeps
    the node id in the structured ``item._id`` and no longer reads ``_nodeid``, so every group was silently
    ignored (pytest-dev/pytest-xdist#1386, open): the ten browser chapters ran on both workers at once, two
    JupyterLab servers and their kernels competing for the two cores with the rest of the suite. This does
    what xdist meant to, on the id pytest reads; it does nothing where xdist's own suffix took effect.
    """
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}
        suffix = "@" + "_".join(sorted(names))
        if names and not item.nodeid.endswith(suffix):
            item._id = type(item._id).parse(item.nodeid + suffix)  # pytest's NodeId


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)  # in case torch was imported before the variable above was set
    torch.manual_seed(0)
    yield
