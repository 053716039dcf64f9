"""One GPU's peak under FSDP2 full sharding, simulated in one process: fake tensors on a fake process group.

The check of :mod:`survey_utils.memory.sharding` (chapter 06): the model is built under ``FakeTensorMode``
exactly as :func:`survey_utils.memory.simulation.simulate` builds it, every transformer block and then the root
are wrapped with ``fully_shard`` (FSDP2, ``FULL_SHARD``: parameters resharded after forward, the root's kept)
on a device mesh of ``gpus`` ranks of torch's ``fake`` backend (collectives return without moving data), and
two steps run under torch's ``FSDPMemTracker``, which labels sharded and unsharded parameters, gradients,
all-gather and reduce-scatter buffers. The second step's peak is reported, as in the single-GPU simulation.

Not simulated here: DDP and ZeRO (DeepSpeed is not a dependency), CPU offload, mixed-precision policies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import check_settings
from survey_utils.methods.registry import get_method
from survey_utils.zoo import load_config


@dataclass(frozen=True)
class ShardedSimulation:
    """Peak bytes of rank 0 under FSDP2 full sharding on ``gpus`` fake ranks, by FSDPMemTracker's categories."""

    gpus: int
    peak: int
    by_category: dict[str, int]
    seconds: float


def _tracker_class() -> type:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class Tracker(FSDPMemTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
                return 1 if not args[0].dtype.is_floating_point else 1.0  # as PeakTracker: a fake has no value
            return super().__torch_dispatch__(func, types, args, kwargs)

    return Tracker


def _fake_group(gpus: int) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() == gpus and dist.get_backend() == "fake":
            return init_device_mesh("cpu", (gpus,))
        dist.destroy_process_group()
    dist.init_process_group(backend="fake", rank=0, world_size=gpus, store=FakeStore())
    return init_device_mesh("cpu", (gpus,))


def simulate_fsdp(model: str, method: str, gpus: int, hp: dict[str, Any] | None = None, batch_size: int = 1,
                  seq_len: int = 512, dtype: str = "bf16", optimizer: str = "adamw") -> ShardedSimulation:
    """Rank 0's peak allocated bytes of a full-shard FSDP2 step over ``gpus`` fake ranks."""
    import torch.distributed as dist

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 2:
        raise SurveyError(f"gpus={gpus!r}: a sharded simulation needs at least 2 ranks")
    config = load_config(model, full=True)
    m = get_method(method)
    resolved = check_settings(config, m, hp or {}, batch_size, seq_len, dtype, None, optimizer, None, "sdpa")
    mesh = _fake_group(gpus)
    start = time.perf_counter()
    try:
        return _run(config, m, resolved, mesh, gpus, batch_size, seq_len, dtype, optimizer, model, start)
    finally:
        dist.destroy_process_group()  # leave no process group behind for the caller


def _run(config: Any, m: Any, resolved: dict[str, Any], mesh: Any, gpus: int, batch_size: int, seq_len: int,
         dtype: str, optimizer: str, model: str, start: float) -> ShardedSimulation:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp import fully_shard

    from survey_utils.memory.simulation import _quiet, build_step, make_optimizer

    with _quiet(), FakeTensorMode():
        step = build_step(config, m, resolved, batch_size, seq_len, dtype, None, optimizer, False, "sdpa")
        n_blocks = _num_blocks(config)
        lists = [x for x in step.model.modules() if isinstance(x, nn.ModuleList) and len(x) > 0]
        blocks = [b for x in lists for b in x if len(x) in n_blocks]
        if not blocks:
            raise SurveyError(f"no transformer blocks found in {model} to wrap with fully_shard")
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(step.model, mesh=mesh)
        opt = make_optimizer(optimizer, [p for p in step.model.parameters() if p.requires_grad])
        tracker = _tracker_class()(step.model, opt)
        tracker.track_inputs(tuple(step.batch.values()))
        with tracker:
            for i in range(2):
                loss = step.model(**step.batch).loss
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i == 0:
                    tracker.reset_mod_stats()
        snap = tracker.get_tracker_snapshot("peak")
    dev = next(iter(snap))
    categories = {getattr(k, "value", str(k)): int(v) for k, v in snap[dev].items()}
    return ShardedSimulation(gpus, categories.pop("Total"), categories, time.perf_counter() - start)


def _num_blocks(config: Any) -> set[int]:
    """The block counts of each stack (T5: encoder and decoder)."""
    counts = {getattr(config, name) for name in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
              if isinstance(getattr(config, name, None), int)}
    return counts
