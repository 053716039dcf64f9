# %% [markdown]
# # Chapter 00 — Preliminaries: where parameters and memory go in a transformer
#
# Every PEFT method is sold on one number, the fraction of parameters it trains. What a user runs out of
# is GPU memory, and the two are not the same thing. This chapter counts both, term by term, for any model
# of the zoo and any registered method, and checks the memory count against a simulation of the real step.
#
# ## Parameters
#
# A decoder block of width $d$, MLP width $d_\text{ff}$, $n_h$ query heads and $n_{kv}$ key/value heads of
# size $d_h$ holds
#
# $$\underbrace{d\,(n_h + 2 n_{kv})\,d_h + n_h d_h\, d}_{\text{attention}}
#   + \underbrace{3\, d\, d_\text{ff}}_{\text{gated MLP}} + \underbrace{2d}_{\text{norms}}$$
#
# parameters, and the model adds $V d$ for the embeddings (and again for an untied head).
#
# ## Memory of one training step
#
# The peak of *allocated* memory in a steady-state step (the optimizer states exist from step 2 on) is
#
# $$M = W + O + \max\bigl(A + 12\,b\,s\,V,\; G + T_\text{opt}\bigr)$$
#
# with $W$ the weights, $O$ the optimizer states ($2\times$ the trainable parameters for AdamW), $A$ the
# activations saved for backward, $12\,bsV$ bytes for the fp32 log-softmax and the two fp32 logit
# gradients alive when backward starts (causal LMs; BERT and T5 take the loss in the model's dtype:
# $3\cdot 2\,bsV$ in bf16), $G$ the gradients and $T_\text{opt}$ the optimizer's temporaries.
# PEFT shrinks $G$ and $O$. It does not shrink $W$ (the frozen model still sits in memory) and barely
# touches $A$: autograd saves a tensor only when an input of its operator requires a gradient, so every
# block from the *lowest trainable module* up keeps its activations. Adapters in block 0 (LoRA's default)
# keep nearly all of them; only methods that start higher (AdapterDrop, LoRA with `layers_to_transform`
# on the top blocks, LLaMA-Adapter) or never reach the backbone (Ladder Side-Tuning) save activations.
# That is why **parameter-efficient is not automatically memory-efficient**.
#
# ## In the three surveys
#
# Xu et al. 2023 (arXiv 2312.12148) and Wang et al. 2024 (arXiv 2410.19878) measure PEFT against full
# fine-tuning, the baseline of both taxonomies; Lialin et al. 2023 (arXiv 2303.15647) compare methods on
# storage, memory, backprop and inference overhead, and warn that "parameter efficiency" covers all of them.

# %%
# %matplotlib widget
import csv
import importlib
import inspect
import statistics

import matplotlib.pyplot as plt
from IPython.display import Code, display

from survey_utils.architecture import params_by_component, total_params
from survey_utils.memory import estimate, simulate
from survey_utils.units import format_bytes
from survey_utils.widgets.memory import MemoryExplorer
from survey_utils.zoo import DATA_DIR, load_config

# %% [markdown]
# ## Where the parameters go
#
# `architecture.params_by_component` reads the config alone (no model is built), so a 405B model costs
# milliseconds.

# %%
models = ["tiny-llama", "gpt2", "bert-base-uncased", "t5-base", "llama-2-7b", "llama-2-70b", "llama-3.1-405b"]
rows = {name: params_by_component(load_config(name)) for name in models}
components = list(next(iter(rows.values())))
print(f"{'model':<16}" + "".join(f"{c:>12}" for c in components) + f"{'total':>16}")
for name, split in rows.items():
    total = total_params(load_config(name))
    print(f"{name:<16}" + "".join(f"{100 * split[c] / total:>11.1f}%" for c in components) + f"{total:>16,}")

# %%
with plt.ioff():
    fig, ax = plt.subplots(figsize=(9, 3.2), layout="constrained")
left = [0.0] * len(models)
for component in components:
    shares = [rows[m][component] / total_params(load_config(m)) for m in models]
    ax.barh(models, shares, left=left, label=component)
    left = [a + b for a, b in zip(left, shares, strict=True)]
ax.set_xlabel("share of the parameters")
ax.legend(ncols=5, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
display(fig.canvas if hasattr(fig.canvas, "comm") else fig)

# %% [markdown]
# Small models are mostly embeddings; from 7B on, the MLP holds about two thirds of the parameters and
# attention a third. LoRA on the query and value projections touches a sliver of the attention share.
#
# ## The memory model, from scratch
#
# `survey_utils.memory.closed_form` writes every term in closed form; each block's saved activations follow
# what transformers' code keeps for backward, tensor by tensor, each tagged with the stage of the block
# where it is saved, so that a block below the lowest trainable module saves nothing and the block that
# holds it saves only what comes after it (here the Llama block):

# %%
activations_module = importlib.import_module("survey_utils.memory.activations")
display(Code(inspect.getsource(activations_module._llama), language="python"))

# %% [markdown]
# ## Check: estimate vs a simulated step vs the real step
#
# `simulate` runs two real training steps (forward, backward, AdamW) of the model built on *fake*
# tensors, under torch's `MemTracker`, which adds and removes every storage's bytes without allocating
# them. On a tiny model the same steps run on real tensors too, and the three numbers are compared.

# %%
for method in ("full", "lora"):
    est = estimate("tiny-llama", method, batch_size=2, seq_len=128)
    fake = simulate("tiny-llama", method, batch_size=2, seq_len=128)
    real = simulate("tiny-llama", method, batch_size=2, seq_len=128, fake=False)
    verdict = "match" if fake.peak == real.peak else "MISMATCH"
    print(f"tiny-llama {method:<5} estimate {est.total:>12,} B  fake step {fake.peak:>12,} B  "
          f"real step {real.peak:>12,} B  ({verdict}; estimate {100 * (est.total - fake.peak) / fake.peak:+.2f}%)")

# %% [markdown]
# ## Why parameter-efficient is not memory-efficient
#
# Llama-2-7B, batch 4, 2048 tokens, bf16, AdamW:

# %%
for method in ("full", "lora"):
    result = estimate("llama-2-7b", method, batch_size=4, seq_len=2048)
    print(f"{method:<5} trainable {result.trainable_params:>14,}  peak {format_bytes(result.total):>10}  "
          + "  ".join(f"{k} {format_bytes(v)}" for k, v in result.terms().items()))
checkpointed = estimate("llama-2-7b", "lora", batch_size=4, seq_len=2048, gradient_checkpointing=True)
print(f"lora + gradient checkpointing: peak {format_bytes(checkpointed.total)}")
print("assumptions:", *checkpointed.assumptions, sep="\n  - ")

# %% [markdown]
# LoRA trains 0.06% of the parameters yet needs more than half of full fine-tuning's memory at this
# length: the frozen weights and the activations stay. Gradient checkpointing, not the method, is what
# removes the activations.
#
# ## The memory explorer
#
# It opens on Llama-2-7B with LoRA ($r = 8$), batch 1, 512 tokens, bf16, AdamW. Pick a model, a method, its
# rank (greyed out for methods without one), the batch, the sequence length, the dtype, the optimizer and
# whether to checkpoint.
#
# * Left: the estimate's terms at the peak, in GiB. Tick *simulate* to run the fake-tensor step beside it:
#   it runs in the background (seconds for 7B, the line above the plot says so) and the other controls stay live.
# * Right: against the sequence length, the weights and optimizer states (flat), the activations and the
#   logits (they grow with $s$), the gradients and the optimizer's temporaries, and the peak, which is the first
#   plus the batch plus the larger of the two phases. The dotted line is the current length; the dashed line
#   marks where the activations and logits overtake the weights and optimizer states.

# %%
explorer = MemoryExplorer(model="llama-2-7b", method="lora")
explorer

# %% [markdown]
# The explorer is a pure function of its controls: setting a value redraws it, as a reader's click would.
# A second one, not displayed (the one above keeps the state the text describes), on the tiny model with the
# simulation run in place:

# %%
tiny = MemoryExplorer(model="tiny-llama", method="lora", background=False)
tiny.controls["seq_len"].value = 128
tiny.controls["simulate"].value = True
view = tiny.view
print(f"estimate {format_bytes(view.estimate.total)}  simulation {format_bytes(view.simulated['_peak'])}  "
      f"activations + logits overtake the weights and optimizer states at s = {view.crossover}")

# %% [markdown]
# ## Across the zoo
#
# `benchmarks/memory_grid.py` runs the estimate and the simulation over models from tiny to 70B, full
# fine-tuning, LoRA and every registered method, batch, sequence length and checkpointing, and writes
# `data/memory_validation.csv` (each row with the command that reproduces it).

# %%
path = DATA_DIR / "memory_validation.csv"
if path.is_file():
    with path.open(encoding="utf-8") as handle:
        grid = list(csv.DictReader(handle))
    errors = sorted(grid, key=lambda r: abs(float(r["relative_error"])))
    print(f"{len(grid)} settings; median |error| "
          f"{100 * statistics.median(abs(float(r['relative_error'])) for r in grid):.2f}%; "
          f"within 5%: {sum(abs(float(r['relative_error'])) <= 0.05 for r in grid)}")
    for row in errors[-3:]:
        print(f"  {100 * float(row['relative_error']):+.1f}%  {row['command']}")
else:
    print("run `python benchmarks/memory_grid.py` to produce data/memory_validation.csv")

# %% [markdown]
# Every family (Llama, Mistral, Qwen2, GPT-2, BERT, T5, OPT, BLOOM) has its own recipe, written from the
# tensors transformers' code saves. The simulation runs CPU kernels, so the grid compares it with the
# estimate for `device="cpu"`: with attention dropout in training, torch's CPU SDPA takes the fp32 math
# path (three fp32 $s^2$ tensors per layer) and dropout keeps its noise in the activation dtype; on CUDA
# (`device="cuda"`, the default) the flash kernels keep no $s^2$ tensor and dropout keeps a 1-byte mask.
# GPT-2's tanh-GELU is Python code that saves four intermediate tensors on either device. The remaining
# misses are with gradient checkpointing (a few tensors of the hidden size that the estimate does not keep).
#
# Seventeen families have such a hand-written recipe. Any other architecture gets one read off its own code
# (`survey_utils.memory.derived`): a few of its blocks run on fake tensors while `saved_tensors_hooks` writes down
# every tensor autograd keeps, once with the backbone frozen and once fully trainable, at two small batch and
# sequence shapes; each saved storage's bytes are then $c\,b^i s^j$ exactly, and the real model's blocks take the
# recipe of their kind. Below, Falcon-7B (no hand recipe) on CUDA's kernels, and the grid's Falcon rows, where the
# estimate on CPU kernels meets the simulation of the same step.

# %%
falcon = estimate("falcon-7b", "lora", {}, batch_size=1, seq_len=512)
print(f"falcon-7b LoRA, 1 x 512 tokens (CUDA kernels): {format_bytes(falcon.total)}, of which activations "
      f"{format_bytes(falcon.activations)}")
for row in (grid if path.is_file() else []):
    if row["model"] == "falcon-7b":
        print(f"  grid: {row['method']:<5} checkpointing={row['gradient_checkpointing']:<5} estimate "
              f"{format_bytes(int(row['estimate_bytes']))}  simulation {format_bytes(int(row['simulated_bytes']))}  "
              f"error {100 * float(row['relative_error']):+.2f}%")

# %% [markdown]
# ## What the surveys report
#
# Lialin et al. compare methods on memory qualitatively (their Table 1); the transcription in
# `data/lialin_comparison.csv` lists, with its source and verification status:

# %%
with (DATA_DIR / "lialin_comparison.csv").open(encoding="utf-8") as handle:
    for row in csv.DictReader(handle):
        print(f"{row['method']:<22} type {row['type']:<4} memory {row['memory'] or '(not transcribed)':<18} "
              f"trainable % {row['pct_trainable'] or '-':<10} [{row['verified']}]")

# %% [markdown]
# ## Summary
#
# * Parameters: embeddings dominate small models, the MLP dominates large ones.
# * Memory: weights + optimizer states + max(activations and logits, gradients and the optimizer step).
#   PEFT removes most gradients and optimizer states, keeps the frozen weights and nearly all activations.
# * Published figures are usually *reserved* memory: add the CUDA context and the allocator's cache.
#
# ## Exercises
#
# 1. At what sequence length do the activations of Llama-2-7B with LoRA overtake its weights at batch 1? At batch 8?
# 2. Switch the attention to `eager` (`estimate(..., attention="eager")`): which term grows as $s^2$?
# 3. With `quantization="nf4"` (QLoRA), how much of the 7B peak is left to the weights?
# 4. Why does fp16 cost more than bf16 for the same trainable parameters? (Look at `master_weights`.)
