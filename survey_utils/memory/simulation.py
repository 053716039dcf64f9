"""Simulate one training step on fake tensors and read its peak memory (chapter 00).

The model is built inside ``FakeTensorMode``: every tensor has a shape, a dtype and a device but no
storage, so a 70B step runs on a laptop. torch's ``MemTracker`` (a dispatch mode) sees every operator
of the forward, backward and optimizer step, adds each new storage's bytes and subtracts them when the
storage dies, which gives the peak of *allocated* memory exactly as the caching allocator would see it,
without its rounding and caching.

Facts this module relies on (torch 2.13, transformers 5.x), each handled below:

- the model is built under the fake mode, never moved (``Module.to()`` fails on fake parameters);
- the stock tracker hooks every parameter and fails on frozen ones: :class:`PeakTracker` hooks only the
  trainable ones;
- its per-module peak bookkeeping costs tens of seconds per 7B step: :class:`PeakTracker` keeps the
  global peak only;
- ``.item()`` has no value on a fake tensor (Adafactor calls it for its step size); the tracker
  answers 1 for it, which changes no tensor's size;
- transformers treats fake tensors as tracing and builds a causal mask a real run skips; it is told
  otherwise for the duration of the simulation;
- fake CPU tensors, not ``meta``: SDPA on ``meta`` takes the math path and inflates activations.

The tracker also records every storage's birth and death in order (:attr:`PeakTracker.trace`); replaying
that trace through :mod:`survey_utils.memory.allocator` gives the *reserved* peak the caching allocator
would reach (:attr:`Simulation.reserved`; the trace is of CPU kernels, like the allocated peak).

Two steps are run and the second one's peak is reported: from the second step on, the optimizer states
exist during the forward and backward passes (the steady state a user sees). ``fake=False`` runs the same
steps on real CPU tensors (tiny models only), which the tests compare against the fake run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from transformers import PretrainedConfig

from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import (
    BNB_BLOCK_SIZE,
    BNB_MIN_8BIT_SIZE,
    BNB_QMAP_ENTRIES,
    check_settings,
)
from survey_utils.methods.registry import Method, get_method
from survey_utils.units import OPTIMIZERS, torch_dtype
from survey_utils.zoo import build_model, load_config, supports_sdpa


@dataclass(frozen=True)
class Simulation:
    """Peak allocated bytes of a simulated step, and the categories at that moment."""

    peak: int
    first_step_peak: int
    by_category: dict[str, int]
    seconds: float
    assumptions: list[str] = field(default_factory=list)
    reserved: int | None = None
    """Peak reserved bytes of the recorded trace replayed through the caching-allocator model (both steps)."""
    reserved_expandable: int | None = None
    """The same with ``expandable_segments:True``."""
    allocated_rounded: int | None = None
    """Peak allocated bytes as the allocator counts them (blocks rounded to 512 B, large ones unsplit)."""

    def as_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "first_step_peak": self.first_step_peak, "by_category": self.by_category,
                "seconds": self.seconds, "assumptions": self.assumptions, "reserved": self.reserved,
                "reserved_expandable": self.reserved_expandable, "allocated_rounded": self.allocated_rounded}


class PeakTracker(MemTracker):
    """``MemTracker`` reduced to what a peak needs: global peak only, grad hooks on trainable parameters.

    Per-module snapshots (the stock tracker deep-copies one at every operator for every active module)
    are skipped; the activation-checkpointing flags are kept so recomputed tensors are labelled as
    activations.
    """

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True
                                         ) -> tuple[int, int]:
        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_memory = 0
        for param in module.parameters():
            winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            param_memory += sum(w.mem_consumed for w in winfos)
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                )
        buffer_memory = 0
        for buffer in module.buffers():
            winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
            buffer_memory += sum(w.mem_consumed for w in winfos)
        return param_memory, buffer_memory

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is None:
            import weakref

            self._ac_mod = weakref.ref(module)
            self._in_ac = True

    def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod = None
            self._in_ac = False

    def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
        return None

    def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
        return None

    trace: list[tuple[str, int, int]] | None = None
    """``("+" | "-", storage key, bytes)`` in order, when set to a list (see :func:`simulate`)."""

    def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: int | None = None,
                     old_reftype: Any = None) -> None:
        super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)
        if self.trace is None:
            return
        name = u_type.name
        if name == "ADD":
            self.trace.append(("+", id(winfo), winfo.mem_consumed))
        elif name == "DEL":
            self.trace.append(("-", id(winfo), winfo.mem_consumed))
        elif name == "SIZE":  # a resized storage: a new block replaces the old one
            self.trace.append(("-", id(winfo), old_mem_consumed or 0))
            self.trace.append(("+", id(winfo), winfo.mem_consumed))

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            total = dev_snap["Total"]
            if self._peak_mem.get(dev, 0) < total:
                self._peak_mem[dev] = total
                self._peak_mem_snap[dev] = dict(dev_snap)

    def reset_peak(self) -> None:
        """Start a new peak from the current memory (between steps)."""
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._curr_mem_snap.items()}
        self._peak_mem_snap = {dev: dict(snap) for dev, snap in self._curr_mem_snap.items()}

    def peak_bytes(self) -> tuple[int, dict[str, int]]:
        total = sum(self._peak_mem.values())
        categories: dict[str, int] = {}
        for snap in self._peak_mem_snap.values():
            for key, value in snap.items():
                label = key.value if hasattr(key, "value") else str(key)
                if label != "Total":
                    categories[label] = categories.get(label, 0) + value
        return total, categories

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            # A fake tensor has no value; Adafactor reads norms with .item() to scale its step.
            return 1 if not args[0].dtype.is_floating_point else 1.0
        return super().__torch_dispatch__(func, types, args, kwargs)


def _is_fake(tensor: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


class AdamW8bitLayout(torch.optim.Optimizer):
    """The memory layout of bitsandbytes' ``AdamW8bit``, for simulation (the update itself is not computed).

    Tensors with at least ``BNB_MIN_8BIT_SIZE`` elements keep both moments as uint8 with one fp32 absmax
    per block of ``BNB_BLOCK_SIZE`` elements; smaller tensors keep fp32 moments; the two 256-entry fp32
    quantization maps are made once and shared (bitsandbytes' ``name2qmap``). bitsandbytes' CUDA kernel
    updates in place, so the step allocates nothing else.
    """

    def __init__(self, params: Any, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})
        self.qmaps: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0  # bitsandbytes counts steps in a Python int
                    if p.numel() >= BNB_MIN_8BIT_SIZE:
                        if self.qmaps is None:
                            self.qmaps = tuple(torch.zeros(BNB_QMAP_ENTRIES, dtype=torch.float32, device=p.device)
                                               for _ in range(2))
                        state["qmap1"], state["qmap2"] = self.qmaps
                        blocks = -(-p.numel() // BNB_BLOCK_SIZE)
                        for k in ("state1", "state2"):
                            state[k] = torch.zeros_like(p, dtype=torch.uint8)
                        for k in ("absmax1", "absmax2"):
                            state[k] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    else:
                        for k in ("state1", "state2"):
                            state[k] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the estimate models (per-parameter, ``foreach=False`` implementations)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=False)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2, foreach=False)
    if name == "adamw8bit":
        return AdamW8bitLayout(params)
    raise SurveyError(f"optimizer '{name}' is not one of {', '.join(OPTIMIZERS)}")


@dataclass
class TrainingStep:
    """A model with its method applied, its optimizer and one batch: everything a step touches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]
    masters: list[tuple[nn.Parameter, nn.Parameter]]
    gradient_checkpointing: bool
    gradient_free: bool = False

    def run(self) -> None:
        """Forward, backward, (mixed precision: copy grads to fp32 masters), optimizer step, zero grads; for a
        :attr:`Method.gradient_free` method, one forward pass and its loss under ``torch.no_grad()``."""
        if self.gradient_free:
            with torch.no_grad():
                loss = self.model(**self.batch).loss
            del loss
            return
        loss = self.model(**self.batch).loss  # outputs (logits) are dropped before backward, as in Trainer
        loss.backward()
        del loss
        for low, master in self.masters:
            master.grad = low.grad.to(torch.float32)
            low.grad = None
        self.optimizer.step()
        for low, master in self.masters:
            with torch.no_grad():
                low.copy_(master)
        self.optimizer.zero_grad(set_to_none=True)


def build_step(config: PretrainedConfig, method: Method, hp: dict[str, Any], batch_size: int, seq_len: int,
               dtype: str, adapter_dtype: str | None, optimizer: str, gradient_checkpointing: bool,
               attention: str, device: str = "cpu", seed: int = 0, quantization: str | None = None) -> TrainingStep:
    """Build the step under whatever mode is active (fake or real). Nothing is moved with ``.to()``.

    ``quantization`` (``nf4``, ``int8``) gives the frozen block linears bitsandbytes' storage and kernels' tensors
    (:mod:`survey_utils.memory.quantized_storage`)."""
    config = copy.deepcopy(config)
    config._attn_implementation = attention if supports_sdpa(config) else "eager"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    base_dtype = torch_dtype(dtype)
    model = build_model(config, device=device, seed=seed, dtype=base_dtype)
    method.apply(model, **hp)
    trainable_dtype = torch_dtype(method.trainable_dtype(dtype, adapter_dtype))
    if trainable_dtype != base_dtype:
        _retype_trainable(model, trainable_dtype)
    if quantization is not None:
        from survey_utils.architecture import layout
        from survey_utils.memory.quantized_storage import quantize_base

        quantize_base(model, layout(config), quantization, method.name)
    model.train()
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise SurveyError(f"model '{config.name_or_path}' does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SurveyError(f"method '{method.name}' left no trainable parameter in '{config.name_or_path}'")
    masters: list[tuple[nn.Parameter, nn.Parameter]] = []
    if trainable_dtype == torch.float16:
        # fp16 mixed precision keeps fp32 master weights that the optimizer updates.
        masters = [(p, nn.Parameter(p.detach().to(torch.float32))) for p in trainable]
        opt = make_optimizer(optimizer, [m for _, m in masters])
    else:
        opt = make_optimizer(optimizer, trainable)
    return TrainingStep(model, opt, make_batch(config, batch_size, seq_len, device), masters,
                        gradient_checkpointing, method.gradient_free)


def make_batch(config: PretrainedConfig, batch_size: int, seq_len: int, device: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and the targets (int64): next tokens for a language model (encoder-decoders get targets as long
    as the inputs); for a task head (:attr:`Layout.task_type`) a label per sequence (``SEQ_CLS``), a label per
    token (``TOKEN_CLS``) or answer start and end positions (``QUESTION_ANS``)."""
    from survey_utils.architecture import layout

    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    task = layout(config).task_type
    labels = max(int(getattr(config, "num_labels", 2) or 2), 1)
    if task == "SEQ_CLS":
        return {"input_ids": ids, "labels": torch.randint(0, labels, (batch_size,), device=device)}
    if task == "TOKEN_CLS":
        return {"input_ids": ids, "labels": torch.randint(0, labels, (batch_size, seq_len), device=device)}
    if task == "QUESTION_ANS":
        return {"input_ids": ids, **{k: torch.randint(0, seq_len, (batch_size,), device=device)
                                     for k in ("start_positions", "end_positions")}}
    return {"input_ids": ids, "labels": ids.clone()}


def _retype_trainable(model: nn.Module, dtype: torch.dtype) -> None:
    """Give trainable parameters their own dtype (peft keeps adapters in fp32) by replacing them."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, and let transformers' mask logic treat fake tensors as the real ones they stand for.

    transformers counts a fake tensor as "tracing" and then materialises the causal mask that a real run
    skips (SDPA's ``is_causal``); every block would then save an s x s mask that the real step never has.
    """
    import warnings

    import transformers.masking_utils as masking

    original = masking.is_tracing
    masking.is_tracing = lambda tensor=None: original(None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        masking.is_tracing = original


def simulate(model_or_config: str | PretrainedConfig, method: str | Method,
             hp: dict[str, Any] | None = None, batch_size: int = 1, seq_len: int = 512, dtype: str = "bf16",
             adapter_dtype: str | None = None, optimizer: str = "adamw", gradient_checkpointing: bool = False,
             quantization: str | None = None, attention: str = "sdpa", fake: bool = True,
             steps: int = 2) -> Simulation:
    """Peak allocated bytes of a training step, run on fake tensors (or real CPU ones with ``fake=False``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = load_config(model_or_config)
    method = get_method(method) if isinstance(method, str) else method
    resolved = check_settings(config, method, hp or {}, batch_size, seq_len, dtype, adapter_dtype, optimizer,
                              quantization, attention, gradient_checkpointing=gradient_checkpointing)
    if steps < 1:
        raise SurveyError(f"steps={steps} must be at least 1")
    start = time.perf_counter()
    mode = FakeTensorMode() if fake else nullcontext()
    with _quiet(), mode:
        try:
            step = build_step(config, method, resolved, batch_size, seq_len, dtype, adapter_dtype, optimizer,
                              gradient_checkpointing, attention, quantization=quantization)
        except RuntimeError as error:
            raise SurveyError(f"method '{method.name}' could not be built on '{config.name_or_path}' with "
                              f"dtype {dtype}/{adapter_dtype or dtype}: {str(error).splitlines()[0]}") from None
        tracker = PeakTracker()
        tracker.trace = []
        tracker.track_external(step.model, *step.batch.values(), *[m for _, m in step.masters])
        tracker._track_module_params_and_buffers(step.model, install_grad_hooks=True)
        peaks: list[tuple[int, dict[str, int]]] = []
        with tracker:
            for _ in range(steps):
                tracker.reset_peak()
                try:
                    step.run()
                except RuntimeError as error:
                    if quantization is None:
                        raise
                    # a method's layer that reads its base weight (DoRA's norm) meets the packed codes
                    raise SurveyError(f"method '{method.name}' cannot run on a simulated {quantization} base (its "
                                      f"layer reads the base weight itself): {str(error).splitlines()[0]}") from None
                tracker.reset_mod_stats()
                peaks.append(tracker.peak_bytes())
    trace = tracker.trace
    tracker.trace = None
    seconds = time.perf_counter() - start
    peak, categories = peaks[-1]
    assumptions = [
        f"{'fake' if fake else 'real'} CPU tensors under torch's MemTracker: allocated bytes, no allocator "
        "rounding or caching",
        f"peak of step {steps} of {steps} (optimizer states already exist: the steady state)",
        "batch = input_ids + labels (int64); loss from the model's own loss function",
        "model in train mode (dropout active where the config sets it)",
    ]
    if quantization is not None:
        assumptions.append(f"{quantization}: frozen block linears held as bitsandbytes 0.50.2 holds them, with its "
                           "kernels' transients (survey_utils.memory.quantized_storage)")
    from survey_utils.memory.allocator import replay

    cached = replay(trace)
    assumptions.append("reserved: the recorded allocation trace (CPU kernels) replayed through the model of "
                       "PyTorch's CUDA caching allocator (survey_utils.memory.allocator), both steps")
    return Simulation(peak, peaks[0][0], categories, seconds, assumptions, reserved=cached.peak_reserved,
                      reserved_expandable=replay(trace, expandable_segments=True).peak_reserved,
                      allocated_rounded=cached.peak_allocated)

