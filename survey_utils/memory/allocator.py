"""Reserved memory: a recorded allocation trace replayed through a model of PyTorch's CUDA caching allocator.

``torch.cuda.max_memory_allocated`` counts tensors; ``max_memory_reserved`` (and ``nvidia-smi``, which adds
the CUDA context) counts the segments the caching allocator obtained with ``cudaMalloc`` and keeps. The
rules below are those of ``c10/cuda/CUDACachingAllocator.cpp`` (pytorch/pytorch, read at commit 001074d2;
the size constants also in ``c10/core/AllocatorConfig.h``), for one stream and the default settings
(``max_split_size`` unlimited, no garbage-collection threshold, no ``roundup_power2_divisions``):

- every request is rounded up to a multiple of 512 bytes (``round_size``, ``kMinBlockSize``);
- requests up to 1 MiB (``kSmallSize``) go to the *small pool*, others to the *large pool*;
- a request no cached block can hold gets a new segment (``get_allocation_size``): 2 MiB (``kSmallBuffer``)
  for small requests, 20 MiB (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``), otherwise the
  request rounded up to 2 MiB (``kRoundLarge``);
- a cached block is chosen *best fit*: the smallest free block of the pool at least as big, ties by address
  (``get_free_block``: ``lower_bound`` in a set ordered by size then pointer);
- the chosen block is split (``should_split``) when what remains is at least 512 bytes in the small pool,
  more than 1 MiB in the large pool; the request takes the front, the rest stays cached;
- a freed block merges with its free neighbours of the same segment (``try_merge_blocks``); segments are
  never returned (no ``empty_cache``, no out-of-memory retry), so reserved memory only grows;
- ``expandable_segments=True``: one segment per pool that grows by mapping pages (2 MiB in the small pool,
  20 MiB in the large pool) at its end, merging with a free block at its end; any remainder of at least
  512 bytes is split off, and best fit prefers blocks that cannot grow.

:func:`replay` returns the peaks of allocated bytes (block sizes, as ``max_memory_allocated`` counts them),
of requested bytes and of reserved bytes. :func:`reserved_closed_form` is the torch-free reserved term the
estimate and the advisor use; it is stated as an assumption wherever it is used. Chapter 00 (memory) and
chapter 06 (what fits) explain it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from survey_utils.memory.closed_form import MemoryEstimate
    from survey_utils.methods.registry import Method

K_MIN_BLOCK = 512
K_SMALL_SIZE = 1 << 20
K_SMALL_BUFFER = 2 << 20
K_LARGE_BUFFER = 20 << 20
K_MIN_LARGE_ALLOC = 10 << 20
K_ROUND_LARGE = 2 << 20

# The CUDA context and loaded kernels, per GPU, outside the allocator: transformers' "Model training anatomy"
# (docs/source/en/model_memory_anatomy.md) loads a (1, 1) tensor and reads "GPU memory occupied: 1343 MB"
# from NVML (MiB). Kept separate from `reserved`; lazy module loading (CUDA 11.7+) often needs less.
CUDA_CONTEXT_BYTES = 1343 * 2**20
CUDA_CONTEXT_SOURCE = ("CUDA context and kernels: 1343 MiB per GPU, as measured in transformers' 'Model training "
                       "anatomy' guide (torch.ones((1, 1)).to('cuda'), NVML); kept apart from reserved memory")

# Fragmentation of the step's transient tensors, derived from this module's replay of the simulated traces on
# the validation grid (benchmarks/reserved_validation.py writes data/reserved_validation.csv; its column
# transient_overhead is (replayed reserved - allocated - block rounding of the persistent tensors) / transient
# peak). Each constant is the largest value of its kind (without / with gradient checkpointing, which frees and
# rebuilds every block's tensors and so fragments far more) over the grid's models of at least 100M parameters
# (in the tiny models, 2 MiB and 20 MiB segments are a sizeable share of the whole step), rounded up to a percent.
# Not fitted to any published figure; tests/memory/test_allocator.py re-derives both from the committed CSV.
TRANSIENT_OVERHEAD = 0.24
TRANSIENT_OVERHEAD_CHECKPOINTED = 0.94
DERIVATION_MIN_PARAMS = 100_000_000

def round_size(size: int) -> int:
    """``round_size``: at least 512 bytes, a multiple of 512."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    return K_MIN_BLOCK * ((size + K_MIN_BLOCK - 1) // K_MIN_BLOCK)


def allocation_size(size: int) -> int:
    """``get_allocation_size``: the segment a (rounded) request that finds no cached block gets."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


class _Block:
    __slots__ = ("addr", "size", "allocated", "prev", "next", "small", "segment")

    def __init__(self, addr: int, size: int, small: bool, segment: int) -> None:
        self.addr, self.size, self.small, self.segment = addr, size, small, segment
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class CachingAllocator:
    """The allocator's state for one device and one stream: segments, blocks, the two pools of free blocks."""

    def __init__(self, expandable_segments: bool = False) -> None:
        self.expandable = expandable_segments
        self.free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # small? -> (size, addr, b)
        self.live: dict[object, _Block] = {}
        self.requested: dict[object, int] = {}
        self.reserved = self.allocated = self.requested_now = 0
        self.peak_reserved = self.peak_allocated = self.peak_requested = 0
        self.segments = 0
        self._next_addr = 0
        self._tails: dict[bool, _Block] = {}  # expandable: the last mapped block of each pool's segment

    # -- pools --------------------------------------------------------------------------------------------
    def _insert(self, block: _Block) -> None:
        bisect.insort(self.free[block.small], (block.size, block.addr, block))

    def _remove(self, block: _Block) -> None:
        pool = self.free[block.small]
        i = bisect.bisect_left(pool, (block.size, block.addr))
        assert pool[i][2] is block
        del pool[i]

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        pool = self.free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        if self.expandable:  # prefer a block that cannot grow (the segment's free end can: it is taken last)
            tail = self._tails.get(small)
            for j in range(i, len(pool)):
                if pool[j][2] is not tail:
                    i = j
                    break
        block = pool[i][2]
        del pool[i]
        return block

    # -- segments -----------------------------------------------------------------------------------------
    def _new_segment(self, size: int, small: bool) -> _Block:
        alloc = allocation_size(size)
        block = _Block(self._next_addr, alloc, small, self.segments)
        self._next_addr += alloc + K_ROUND_LARGE  # segments are not contiguous
        self.segments += 1
        self._grow(alloc)
        return block

    def _expand(self, size: int, small: bool) -> _Block:
        page = K_SMALL_BUFFER if small else K_LARGE_BUFFER
        tail = self._tails.get(small)
        if tail is None:
            grow = page * math.ceil(size / page)
            block = _Block(self._next_addr, grow, small, self.segments)
            self._next_addr += 1 << 50  # the segment's virtual address range
            self.segments += 1
        elif not tail.allocated:
            self._remove(tail)
            grow = page * math.ceil((size - tail.size) / page)
            tail.size += grow
            block = tail
        else:
            grow = page * math.ceil(size / page)
            block = _Block(tail.addr + tail.size, grow, small, tail.segment)
            block.prev, tail.next = tail, block
        self._tails[small] = block
        self._grow(grow)
        return block

    def _grow(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    # -- malloc / free ------------------------------------------------------------------------------------
    def malloc(self, key: object, nbytes: int) -> None:
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        block = self._best_fit(size, small)
        if block is None:
            block = self._expand(size, small) if self.expandable else self._new_segment(size, small)
        remaining = block.size - size
        split = remaining >= K_MIN_BLOCK if (small or self.expandable) else remaining > K_SMALL_SIZE
        if split:
            rest = _Block(block.addr + size, remaining, small, block.segment)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            if self._tails.get(small) is block:
                self._tails[small] = rest
            self._insert(rest)
        block.allocated = True
        self.live[key] = block
        self.requested[key] = nbytes
        self.allocated += block.size
        self.requested_now += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_requested = max(self.peak_requested, self.requested_now)

    def free_(self, key: object) -> None:
        block = self.live.pop(key)
        self.allocated -= block.size
        self.requested_now -= self.requested.pop(key)
        block.allocated = False
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove(neighbour)
                if neighbour is block.prev:  # [neighbour block]
                    block.addr = neighbour.addr
                    block.prev = neighbour.prev
                    if block.prev is not None:
                        block.prev.next = block
                else:  # [block neighbour]
                    block.next = neighbour.next
                    if block.next is not None:
                        block.next.prev = block
                block.size += neighbour.size
                if self._tails.get(block.small) is neighbour:
                    self._tails[block.small] = block
        self._insert(block)


@dataclass(frozen=True)
class Replay:
    """Peaks of a replayed trace: requested bytes, allocated (rounded blocks) and reserved (segments)."""

    peak_requested: int
    peak_allocated: int
    peak_reserved: int
    segments: int
    events: int
    expandable_segments: bool

    def as_dict(self) -> dict[str, int | bool]:
        return {"peak_requested": self.peak_requested, "peak_allocated": self.peak_allocated,
                "peak_reserved": self.peak_reserved, "segments": self.segments, "events": self.events,
                "expandable_segments": self.expandable_segments}


def replay(trace: Iterable[tuple[str, object, int]], expandable_segments: bool = False) -> Replay:
    """Replay ``("+", key, bytes)`` / ``("-", key, bytes)`` events in order (see :func:`simulate`'s trace)."""
    alloc = CachingAllocator(expandable_segments)
    events = 0
    for op, key, nbytes in trace:
        events += 1
        if op == "+":
            if nbytes > 0:
                alloc.malloc(key, nbytes)
        elif key in alloc.live:
            alloc.free_(key)
    return Replay(alloc.peak_requested, alloc.peak_allocated, alloc.peak_reserved, alloc.segments, events,
                  expandable_segments)


def persistent_rounding(tensor_bytes: Iterable[int]) -> int:
    """Bytes lost to block rounding by tensors allocated once, one after another, and never freed (weights,
    optimizer states): each block's size minus its request, with the rules above (512 B rounding, and a large
    block keeps a remainder of up to 1 MiB it may not split off). The free ends of their segments are not
    counted: the step's transient tensors reuse them."""
    alloc = CachingAllocator()
    total = 0
    for i, nbytes in enumerate(tensor_bytes):
        if nbytes > 0:
            alloc.malloc(i, nbytes)
            total += nbytes
    return alloc.allocated - total


def reserved_closed_form(allocated_peak: int, rounding: int, transient_peak: int, checkpointed: bool = False
                         ) -> tuple[int, str]:
    """Reserved bytes (CUDA context excluded) for a step whose allocated peak is ``allocated_peak``: the
    ``rounding`` of the persistent tensors (:func:`persistent_rounding`), plus :data:`TRANSIENT_OVERHEAD` (or
    :data:`TRANSIENT_OVERHEAD_CHECKPOINTED`) of the transient peak (the replay's fragmentation on the validation
    grid). Returns the bytes and the assumption in words."""
    share = TRANSIENT_OVERHEAD_CHECKPOINTED if checkpointed else TRANSIENT_OVERHEAD
    extra = math.ceil(share * max(transient_peak, 0))
    note = (f"reserved = allocated + {rounding:,} B of block rounding of the persistent tensors (the caching "
            f"allocator's 512 B rounding and unsplit large blocks) + {share:.0%} of the transient peak "
            f"({'with' if checkpointed else 'without'} gradient checkpointing: the largest fragmentation seen when "
            "replaying simulated steps of models of 100M+ parameters through the allocator model; "
            "benchmarks/reserved_validation.py)")
    return allocated_peak + rounding + extra, note


def persistent_tensors(config: Any, method: Method, est: MemoryEstimate, optimizer_states: bool = False
                       ) -> list[int]:
    """Bytes of each tensor allocated once and kept, in model order: the base weights in their storage (NF4
    for the block linears of a quantized base), and with ``optimizer_states`` the optimizer's states of every
    base tensor (full fine-tuning). Small trainable tensors of PEFT methods are left out: the small pool packs
    them into 2 MiB segments with at most one partly used segment."""
    from survey_utils.architecture import layout
    from survey_utils.memory.closed_form import NF4_BYTES_PER_WEIGHT
    from survey_utils.units import DTYPE_BYTES

    shape = layout(config)
    base = next((DTYPE_BYTES[k] for k in est.weights_by_dtype if k in DTYPE_BYTES), 2)
    nf4 = method.base_quantization is not None
    sizes = []
    for m in shape.modules:
        if m.tied_to:
            continue
        for name, n in m.params:
            quantized = nf4 and name == "weight" and m.kind in ("linear", "conv1d") and m.layer is not None
            sizes.append(int(n * NF4_BYTES_PER_WEIGHT) if quantized else n * base)
    if optimizer_states:
        per_state = est.optimizer_states / max(est.trainable_params, 1)
        sizes += [int(n * per_state) for m in shape.modules if not m.tied_to for _, n in m.params]
    return sizes


_ROUNDING: dict[tuple[int, ...], int] = {}


def cached_rounding(sizes: list[int]) -> int:
    """:func:`persistent_rounding`, remembered (most methods of a model share their persistent tensors)."""
    key = (len(sizes), sum(sizes), hash(tuple(sizes)))
    if key not in _ROUNDING:
        _ROUNDING[key] = persistent_rounding(sizes)
    return _ROUNDING[key]


_OF: dict[tuple[Any, ...], int] = {}


def reserved_of(config: Any, method: Method, est: MemoryEstimate) -> tuple[int, str]:
    """Closed-form reserved bytes of one GPU running the step ``est`` describes (no sharding)."""
    persistent = est.weights + est.optimizer_states + est.master_weights
    key = (id(config), getattr(config, "name_or_path", None), method.base_quantization, method.trains_whole_model,
           tuple(est.weights_by_dtype), est.optimizer_states if method.trains_whole_model else 0,
           est.trainable_params if method.trains_whole_model else 0)
    rounding = _OF.get(key)
    if rounding is None:
        rounding = _OF[key] = cached_rounding(persistent_tensors(config, method, est, method.trains_whole_model))
    checkpointed = "one block recomputed" in est.activations_by_term
    return reserved_closed_form(est.total, rounding, est.total - persistent, checkpointed)
