# %%
# %matplotlib widget

# %% [markdown]
# # 07 · The surveys' figures, regenerated
#
# Three surveys organise parameter-efficient fine-tuning (PEFT) with a figure or a table:
#
# - **Xu et al. 2023** (arXiv 2312.12148): an evolutionary timeline (Fig. 1) and a taxonomy tree (Fig. 2) with
#   five families: additive, partial, reparameterized, hybrid, unified;
# - **Wang et al. 2024** (arXiv 2410.19878): a taxonomy mind map (Fig. 4) with six families: additive,
#   reparameterized, selective, hybrid, quantization, multi-task;
# - **Lialin et al. 2023** (arXiv 2303.15647): a Venn diagram of three classes, additive (A), selective (S) and
#   reparametrization-based (R), with the hybrids in the overlaps (Fig. 2 of v1), and a comparison of the methods
#   by storage, memory, backpropagation cost, inference overhead (Table 1) and by % trainable and % changed
#   parameters (Table 2).
#
# This chapter rebuilds each of them from two things this project can vouch for: a **catalogue** of every
# method the taxonomies name, each fact with its source (`data/catalogue.csv`), and **measurements** of our own
# from-scratch implementations. The figures are made by `python -m survey_utils figures`; each one is shown
# below at full width with, under it, a description in words of the survey figure it corresponds to (open the
# SVG in `figures/` to zoom). We do not reproduce the surveys' images.
#
# **An honest limit.** When the catalogue was built, the survey figures and tables themselves could not be
# read: Lialin et al.'s placements were checked against the survey's own v1 text, Xu et al.'s against secondary
# copies of Fig. 2, and Wang et al.'s rest on research notes marked *unverified*. Figure numbers below are
# the ones the catalogue's sources give. `data/catalogue_sources.md` says what was checked, row by row.

# %%
import inspect
from pathlib import Path

import pandas as pd

from survey_utils.catalogue import implemented_keys, load_catalogue, summary
from survey_utils.figures.explorer import ComparisonExplorer, side_by_side
from survey_utils.figures.measured import changed_params, changed_params_real, comparison_rows

entries = load_catalogue()
facts = summary(entries)
print(f"{facts['rows']} catalogued methods: {facts['verified_checked']} checked against a survey's text, "
      f"{facts['verified_partly']} checked in part (paper metadata only), {facts['verified_unverified']} unverified")
print(f"placed by Xu et al.: {facts['xu_placed']}, by Wang et al.: {facts['wang_placed']}, "
      f"by Lialin et al.: {facts['lialin_placed']}; a reported % trainable for {facts['pct_reported']}")
print(f"implemented here (derived from the method registry): {sorted(implemented_keys(entries))}")

# %% [markdown]
# Whether a method is implemented is never typed in the catalogue: it is the set of catalogue keys that are
# also registered method names. A chapter that registers a new method makes it appear, filled in, in every
# figure below with no change to the figure code.
#
# ## 1 · The timeline (Xu et al., Fig. 1)
#
# **The survey figure, in words.** An evolutionary timeline of PEFT methods by year, each method coloured by its
# family in Xu et al.'s taxonomy.
#
# **Ours.** Every dated catalogue row in the column of its first public version (the arXiv submission year, not
# the venue year), coloured by Xu et al.'s family where the catalogue has it, else Wang et al.'s, else Lialin
# et al.'s class. Filled boxes are implemented here.

# %%
side_by_side("timeline")

# %% [markdown]
# ## 2 · The taxonomy trees (Xu et al., Fig. 2; Wang et al., Fig. 4)
#
# **The survey figures, in words.** Xu et al.'s Fig. 2 is a tree: five families, each split into sub-groups
# (for example additive into adapter-based, soft prompt-based and others; partial into bias update, pretrained
# weight masking and delta weight masking), with the methods as leaves. Wang et al.'s Fig. 4 is a mind map with
# six families, adding quantization and multi-task families and splitting reparameterized methods into
# low-rank decomposition and LoRA derivatives.
#
# **Ours.** The same trees drawn from the catalogue's family and sub-group columns. They hold fewer leaves
# than the surveys, which name more methods than the research notes recorded.

# %%
side_by_side("taxonomy_xu")

# %%
side_by_side("taxonomy_wang")

# %% [markdown]
# ## 3 · Lialin et al.'s Venn diagram (Fig. 2 of v1)
#
# **The survey figure, in words.** Three overlapping classes: additive methods, containing adapters and soft
# prompts; selective methods; reparametrization-based methods. Hybrids sit in the overlaps, for example
# MAM adapter between adapters and soft prompts, UniPELT where adapters, soft prompts and reparametrization meet,
# S4 in adapters, selective and reparametrization at once, and sparse LoRA between selective and
# reparametrization.
#
# **Ours.** Each method is written at the point deepest inside its region (found on a grid, so a region the
# catalogue gains later gets a place too); implemented methods in bold.

# %%
side_by_side("lialin_venn")

# %% [markdown]
# ## 4 · Lialin et al.'s comparison table, measured (Tables 1 and 2)
#
# **The survey tables, in words.** Table 1 rates each method as type (A, S, R or a mix), whether it adds
# storage, whether it adds memory, whether it reduces the cost of backpropagation, and its inference overhead
# (none, extra FFN, extra input). Table 2 gives the % of parameters trained and the % changed (LoRA trains
# few but, once merged, changes whole matrices; diff pruning trains a full copy plus a mask).
#
# **Ours.** Every column is *measured on our implementations*, at default hyper-parameters:
#
# - **storage**: trainable parameters × bytes per element, the size of the saved trainable state;
# - **memory**: the memory model's peak for one training step (chapter 00), and its share of full fine-tuning;
# - **backprop**: whether gradients flow through the backbone (`Method.backprop_through_backbone`);
# - **inference overhead**: extra FLOPs of a forward pass *after merging*, counted by torch's `FlopCounterMode`
#   on the tiny model of the same architecture, and the extra latency from `benchmarks/inference_overhead.py`
#   (`data/inference_overhead.csv`; latency is noisy, so it is measured by the benchmark, never in the figure).
#   The column is shown when the methods whose merged model is the base model itself (no extra FLOPs, base
#   weights unquantized) agree within 5%: that spread is the noise. A quantized base (QLoRA, LoftQ, QA-LoRA,
#   PEQA) adds no counted FLOPs yet is slower, because it dequantizes its weights at every forward pass;
# - **% trainable** and **% changed**, both of the base model's parameters.
#
# The % changed comes from the model built on `meta`: apply the method, call `merge()`, and see which base
# tensors were written, through their in-place version counters. Here is that code:

# %%
print(inspect.getsource(changed_params))

# %% [markdown]
# **Check.** The same count, element by element, on a real tiny model: move every trainable value (a
# stand-in for training), merge, and count the base values that changed plus the added parameters that stay.

# %%
for name in ["lora", "ia3", "prompt_tuning"]:
    real = changed_params_real("tiny-llama", name)
    structural = changed_params("tiny-llama", name)
    print(f"{name:<14} structural {structural[0]:>9,}  real merge {real[0]:>9,}  of {real[1]:,}  "
          f"{'match' if real == structural else 'MISMATCH'}")

# %% [markdown]
# The figure, at its reference setting (roberta-base, batch 8 × 128 tokens, bf16, AdamW):

# %%
side_by_side("lialin_comparison")

# %% [markdown]
# ### Choose the reference model and setting
#
# The widget recomputes the whole table for any zoo model (big ones are built on `meta`) and any batch,
# sequence length, dtype and optimizer. The two panels show % trainable and the peak memory of every
# method; the table below them has every column, and every "n/a" or "noisy" cell has its one-line reason in
# the notes under the table (a method that cannot adapt the model, a sequence longer than its context). Extra FLOPs are read from the benchmark's CSV where it
# measured the method on that tiny model, and measured on the spot otherwise.

# %%
explorer = ComparisonExplorer(model="roberta-base")
explorer

# %% [markdown]
# The widget is a pure function of its controls: set one, and the panels and table follow. A second one, not
# displayed, so that the one above stays on roberta-base as the text says:

# %%
llama = ComparisonExplorer(model="llama-2-7b", seq_len=512)
lora = next(r for r in llama.view if r.method == "lora")
print(f"llama-2-7b, LoRA: {lora.trainable_pct:.3f}% trainable, {lora.changed_pct:.2f}% changed after merging")

# %% [markdown]
# ## 5 · % trainable against model size, and memory
#
# **In the surveys.** The surveys report one % trainable per method, each measured on the model its paper used
# (Lialin et al.'s Table 2; Wang et al.'s per-method tables). **Ours**: the closed-form % for every implemented
# method on every model of the zoo, which shows how much a single number depends on the model. The memory
# breakdown splits one training step of every method into weights, optimizer states, gradients, activations;
# the last figure checks the memory model's estimate against a simulated step (chapter 00).

# %%
side_by_side("trainable_vs_size")

# %%
side_by_side("memory_breakdown")

# %%
side_by_side("memory_validation")

# %% [markdown]
# ## 6 · What the surveys report
#
# The % trainable the catalogue has for the implemented methods, each with its source, beside our closed form on
# roberta-base at default hyper-parameters. They need not agree: the papers' settings (model, rank, targets)
# differ from our defaults.

# %%
ours = {r.method: r for r in comparison_rows(flops="csv")}
rows = [{"method": e.key, "reported %": e.pct_trainable_text, "source": e.pct_trainable_source,
         "ours % (roberta-base)": round(ours[e.key].trainable_pct, 4) if ours[e.key].trainable_pct else None,
         "verified": e.verified}
        for e in entries if e.key in ours and e.pct_trainable is not None]
pd.DataFrame(rows)

# %% [markdown]
# Lialin et al.'s own % columns, as the research notes transcribed them (`data/lialin_comparison.csv`): every
# row is **unverified**, since the table could not be read; the `note` column compares each value with the
# survey's text, and two of them (BitFit, MAM adapter) conflict with it.

# %%
pd.read_csv(Path("..") / "data" / "lialin_comparison.csv")[["method", "type", "pct_trainable", "pct_changed",
                                                             "verified", "note"]]

# %% [markdown]
# ## Summary
#
# - The three taxonomies disagree in their cuts: Xu et al.'s *partial* is Wang et al.'s *selective* and Lialin
#   et al.'s *S*; Wang et al. add quantization and multi-task families; Lialin et al. make hybrids overlaps
#   rather than a family.
# - Measured, "parameter-efficient" splits into separate questions: LoRA trains 0.2% of roberta-base but,
#   merged, changes about 11% of it; adapters add FLOPs at inference and LoRA-like methods add none after merging;
#   memory falls far less than the trainable count does.
# - Every figure here is regenerated by `python -m survey_utils figures`, byte for byte.
#
# ## Exercises
#
# 1. Add a row to `data/catalogue.csv` for a method you know (with its source), run `python -m survey_utils
#    figures --only timeline lialin_venn`, and find it. What does the catalogue test say if you leave `source`
#    empty?
# 2. In the widget, switch from roberta-base to llama-2-7b. Which methods' % trainable falls most, and why
#    (hint: what does each method's count scale with)?
# 3. Why is the extra-FLOPs cell of every LoRA-family method "none", and why is prompt tuning's not?
# 4. Lialin et al. give LoRA "0.5-30%" changed. With `lora`'s `target_modules`, find settings that reach both ends.
