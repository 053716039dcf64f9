"""Memory of a training step: estimate (closed form), simulate (fake tensors), measure (real step); chapter 00.

``estimate`` gives every term in bytes with its assumptions; ``simulate`` runs the real step on fake tensors
under torch's ``MemTracker``; ``measure`` reads CUDA's counters (or tracks a real CPU step of a tiny model).
``cli_memory`` is the ``python -m survey_utils memory`` command (its ``--json`` carries ``reserved``, the
caching allocator's segments without the CUDA context, and ``cuda_context``, a documented per-GPU constant);
``validation_figure`` draws estimate vs simulation from ``data/memory_validation.csv``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from survey_utils.memory.closed_form import MemoryEstimate, estimate
from survey_utils.units import format_bytes

# The submodules are named apart from the functions they define (closed_form.estimate, simulation.simulate,
# measurement.measure), so importing a submodule never rebinds a function's name here.
_LAZY = {"Measurement": "measurement", "measure": "measurement", "Simulation": "simulation", "simulate": "simulation"}


def __getattr__(name: str) -> Any:
    """The simulation and the measurement import torch: load them on first use, so the closed form stays fast."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"survey_utils.memory.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'survey_utils.memory' has no attribute '{name}'")

__all__ = ["MemoryEstimate", "Measurement", "Simulation", "cli_memory", "estimate", "format_bytes", "measure",
           "simulate", "validation_figure"]


def cli_memory(args: argparse.Namespace) -> int:
    """``python -m survey_utils memory``: the breakdown and its assumptions; ``--json`` for one object."""
    from survey_utils.methods import get_method

    method = get_method(args.method)
    hp = method.parse_settings(args.settings)
    settings: dict[str, Any] = dict(
        batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
        optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
        quantization=args.quantization, attention=args.attention,
    )
    device = getattr(args, "device", "cuda")
    result = estimate(args.model, method, hp, device=device, **settings)
    sim = None
    if args.simulate:
        from survey_utils.memory.simulation import simulate

        sim = simulate(args.model, method, hp, **settings)
    # The simulation runs CPU kernels: its error is taken against the CPU estimate (like with like).
    versus = result if sim is None or device == "cpu" else estimate(args.model, method, hp, device="cpu", **settings)
    from survey_utils.memory.allocator import CUDA_CONTEXT_BYTES, CUDA_CONTEXT_SOURCE

    reserved, reserved_note = result.reserved, ""  # the estimate states its reserved term among its assumptions
    reserved_source = "closed form (estimate)"
    if sim is not None and sim.reserved is not None:
        # The replay runs the simulated (CPU-kernel) step: add its allocator overhead to this estimate.
        reserved = result.total + (sim.reserved - sim.peak)
        reserved_source = "replay of the simulated step's allocation trace through the allocator model"
        reserved_note = ("reserved = this estimate + the allocator overhead (reserved - allocated) of the simulated "
                         "step's trace replayed through survey_utils.memory.allocator")
    if args.json:
        payload = result.as_dict()
        payload["reserved"] = reserved
        payload["reserved_source"] = reserved_source
        payload["cuda_context"] = CUDA_CONTEXT_BYTES
        payload["assumptions"] = [*payload["assumptions"], *([reserved_note] if reserved_note else []),
                                  CUDA_CONTEXT_SOURCE]
        if sim is not None:
            payload["simulated_peak"] = sim.peak
            payload["simulation"] = sim.as_dict()
            payload["relative_error"] = (versus.total - sim.peak) / sim.peak
            payload["cpu_estimate"] = versus.total
        print(json.dumps(payload))
        return 0
    print(f"model {args.model}  method {method.name}  batch {args.batch_size}  seq {args.seq_len}  "
          f"dtype {args.dtype}{'/' + args.adapter_dtype if args.adapter_dtype else ''}  optimizer {args.optimizer}"
          f"{'  checkpointing' if args.gradient_checkpointing else ''}"
          f"{'  ' + args.quantization if args.quantization else ''}  attention {args.attention}  device {device}")
    print(f"trainable parameters {result.trainable_params:,} of {result.total_params:,}")
    rows = [("weights", result.weights), ("gradients", result.gradients),
            ("optimizer states", result.optimizer_states), ("master weights", result.master_weights),
            ("activations", result.activations), ("logits and loss (transient)", result.loss_transient),
            ("optimizer step (transient)", result.optimizer_transient), ("batch", result.batch)]
    for label, value in rows:
        print(f"  {label:<30} {format_bytes(value):>12}")
    for dtype, value in result.weights_by_dtype.items():
        print(f"    weights in {dtype:<19} {format_bytes(value):>12}")
    for term, value in result.activations_by_term.items():
        print(f"    activations: {term:<40} {format_bytes(value):>12}")
    print(f"  {'peak allocated (estimate)':<30} {format_bytes(result.total):>12}   at the {result.peak_phase}")
    if sim is not None:
        error = 100 * (versus.total - sim.peak) / sim.peak
        if versus is not result:
            print(f"  {'peak allocated (estimate, CPU)':<30} {format_bytes(versus.total):>12}")
        print(f"  {'peak allocated (simulation)':<30} {format_bytes(sim.peak):>12}   CPU estimate {error:+.2f}%  "
              f"({sim.seconds:.1f} s)")
    print(f"  {'reserved (' + ('replayed' if sim is not None else 'closed form') + ')':<30} "
          f"{format_bytes(reserved):>12}   + CUDA context {format_bytes(CUDA_CONTEXT_BYTES)} per GPU")
    print("assumptions:")
    for line in result.assumptions + ([reserved_note] if reserved_note else []) + [CUDA_CONTEXT_SOURCE] \
            + (sim.assumptions if sim else []):
        print(f"  - {line}")
    print(f"note: {result.cuda_overhead_note}")
    return 0


def validation_figure(out_dir: str | Path = "figures", csv_path: str | Path | None = None) -> list[Path]:
    """Estimate vs simulation from ``data/memory_validation.csv``: a png and an svg, byte-for-byte reproducible."""
    from survey_utils.memory.figure import draw_validation

    return draw_validation(Path(out_dir), csv_path)
