# %% [markdown]
# # Chapter 03 — Selective methods: BitFit, LN tuning, partial fine-tuning, sparse masks and diff pruning
#
# Selective methods add nothing to the model: they pick a subset $S$ of the pretrained parameters and train
# only those. Xu et al. 2023 call the family *partial* fine-tuning (bias update, pretrained-weight masking,
# delta-weight masking); Wang et al. 2024 call it *selective* PEFT (unstructured and structured masking);
# Lialin et al. 2023 draw it as the *selective* circle of their Venn diagram.
#
# ## The idea
#
# With parameters $\theta = (\theta_{\bar S}, \theta_S)$, only $\theta_S$ moves:
#
# $$\theta_S \leftarrow \theta_S - \eta\, \nabla_{\theta_S} L(\theta), \qquad \theta_{\bar S} \text{ frozen.}$$
#
# * **BitFit** (Ben Zaken et al. 2022): $S$ = the bias terms, $h = W_0 x + b$ with only $b$ trained.
# * **LN tuning** (Qi et al. 2022): $S$ = the normalisation layers' gain and bias,
#   $\gamma \odot \frac{x-\mu}{\sigma} + \beta$.
# * **Partial fine-tuning** (Lee et al. 2019): $S$ = the top $k$ blocks, or one component of them
#   (attention; cross-attention, Gheini et al. 2021's "Xattn tuning"; the FFN, as FAR).
#
# The sparse methods select *entries* of weights through a gradient mask $m$, $\theta \leftarrow \theta - \eta\,
# (m \odot g)$, keeping $k = \lfloor \rho\, n \rfloor$ of each weight's $n$ entries (density $\rho$):
#
# * **FISH mask** (Sung et al. 2021): the $k$ entries with the largest empirical Fisher information
#   $\hat F_i = \frac1N \sum_n (\partial_{\theta_i} \log p(y_n \mid x_n))^2$, fixed before training.
# * **LT-SFT** (Ansell et al. 2022): fine-tune fully, keep the $k$ entries that moved most,
#   $|\theta^{(1)}_i - \theta^{(0)}_i|$, rewind to $\theta^{(0)}$, retrain through the mask.
# * **Child-tuning** (Xu et al. 2021): a child network; variant F draws a random mask every step (gradients
#   scaled by $1/p_F$), variant D takes the top-$p_D$ Fisher entries once.
# * **Diff pruning** (Guo et al. 2021): $\theta_\tau = \theta_0 + z \odot \delta$ with a dense delta $\delta$ and a
#   hard-concrete gate $z$ per weight, an $L_0$ penalty $\lambda\,\mathbb E\|z\|_0$, then magnitude pruning of
#   $z \odot \delta$ to the density.
#
# For a masked method, *trainable* means the entries a step may change: the count is the mask's non-zeros,
# exact from the layout (data decide which entries, never how many), while autograd and AdamW still hold dense
# gradients and moments for the masked weights.
#
# Lialin et al. insist on three different counts: parameters **trained**, parameters **changed** once the
# update is applied, and bytes **stored** per task. A selective method changes exactly what it trains; LoRA
# trains little but, merged, rewrites whole matrices. This chapter measures all three.

# %%
# %matplotlib widget
import inspect

from IPython.display import Code, Markdown, display

from survey_utils.counting import format_rows, three_way
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch03_selective import (
    diff_pruning_run,
    footprint_table,
    format_footprints,
    train_and_compare,
)
from survey_utils.memory import estimate
from survey_utils.methods import list_methods
from survey_utils.methods.layers.selective import DiffLinear, attach_mask
from survey_utils.methods.selective import apply_bitfit, partial_selection, unfreeze
from survey_utils.parity import parity
from survey_utils.units import format_bytes
from survey_utils.widgets.density import DensityExplorer

selective = list_methods(family="selective")

# %% [markdown]
# ## Where they sit in the three surveys

# %%
display(Markdown(
    "| method | Xu et al. 2023 | Wang et al. 2024 | Lialin et al. 2023 |\n|---|---|---|---|\n"
    + "\n".join(f"| {m.title} | {m.taxonomy.xu} | {m.taxonomy.wang} | {m.taxonomy.lialin} |" for m in selective)
))

# %% [markdown]
# ## From scratch
#
# Every selective method is the same two steps: name the parameters from the model's layout, then flip
# `requires_grad`. Nothing is created, so the model's total does not change.

# %%
display(Code(inspect.getsource(unfreeze), language="python"))
display(Code(inspect.getsource(apply_bitfit), language="python"))
display(Code(inspect.getsource(partial_selection), language="python"))

# %% [markdown]
# The sparse methods keep a weight trainable and filter its gradient: the kept flat indices sit in a buffer beside
# the weight (its length is the trainable count, on `meta` too). Diff pruning adds a gated delta instead.

# %%
display(Code(inspect.getsource(attach_mask), language="python"))
display(Code(inspect.getsource(DiffLinear.gate), language="python"))

# %% [markdown]
# ## Check 1 — three counts agree
#
# The closed form, our method applied to the model built on `meta`, and peft where peft has the method
# (LN tuning). peft has no BitFit; its BEFT adds a new bias vector to chosen linears instead (tested in
# `tests/methods/test_selective.py`: same count and same outputs as our BitFit on the value biases).

# %%
rows = [three_way(model, m.name) for model in ("roberta-base", "t5-base") for m in selective
        if not (m.name == "bitfit" and model == "t5-base")]
rows.append(three_way("t5-base", "partial", top_k=12, components="cross_attention"))
rows += [three_way("llama-2-7b", name) for name in ("fish_mask", "lt_sft", "child_tuning", "diff_pruning")]
print(format_rows(rows))

# %% [markdown]
# peft's LN tuning trains a deep copy of each target norm and keeps the original frozen: its *total* is
# larger than ours by the norms' size, its trainable count is the same.

# %%
print(parity("tiny-llama", "ln_tuning"))

# %% [markdown]
# ## Bad input is one line
#
# Llama's linear layers and RMSNorms have no bias, so BitFit has nothing to train there.

# %%
for model, method, hp in (("llama-2-7b", "bitfit", {}), ("llama-2-7b", "partial", {"top_k": 40}),
                          ("llama-2-7b", "partial", {"components": "cross_attention"}),
                          ("llama-2-7b", "fish_mask", {"density": 0.0}),
                          ("llama-2-7b", "diff_pruning", {"target_modules": ["query"]})):
    try:
        three_way(model, method, **hp)
    except SurveyError as error:
        print(f"{method} {hp}: {error}")

# %% [markdown]
# ## Check 2 — on real tensors, only the selection moves
#
# A tiny model with real fp32 weights, three AdamW steps on random tokens, then every parameter compared
# with its pretrained value element by element.

# %%
for model, method, hp in (("tiny-bert", "bitfit", {}), ("tiny-llama", "ln_tuning", {}),
                          ("tiny-gpt2", "partial", {"top_k": 1}),
                          ("tiny-t5", "partial", {"top_k": 2, "components": "cross_attention"}),
                          ("tiny-llama", "fish_mask", {"density": 0.05, "num_samples": 4}),
                          ("tiny-gpt2", "lt_sft", {"full_ft_steps": 3}),
                          ("tiny-bert", "child_tuning", {"num_samples": 4})):
    r = train_and_compare(model, method, steps=3, **hp)
    print(f"{model:<11}{method:<10} trained {r.trained:>8,}  changed {r.changed:>8,}  frozen {r.frozen:>9,}  "
          f"frozen bit-identical: {r.frozen_identical}")

# %% [markdown]
# For the masked methods "frozen" includes every entry outside the mask: those stay bit-identical too (AdamW
# with weight decay off: decoupled decay would move them).
#
# ## Diff pruning on real tensors
#
# Trained: a dense delta and a gate logit per weight (twice the block linears). Kept by magnitude pruning to 0.5%
# of each weight, and changed by merging: only those entries.

# %%
d = diff_pruning_run("tiny-llama", steps=3)
print(f"tiny-llama: trained {d.trained:,} ({d.trained / d.total:.0%} of the model), kept after pruning {d.kept:,}, "
      f"base elements changed by merging {d.changed:,}")

# %% [markdown]
# ## Explore: density, k, components
#
# The selective method (left of each pair) beside LoRA on the query and value projections at the rank whose
# trainable count is closest. Move `top_k`: partial tuning's trained and changed bars move together; LoRA's
# changed bar is every element of every q and v matrix. Pick BitFit on a Llama model: the message says why
# it cannot apply. Pick diff pruning, then FISH mask, at the same density: the same entries changed and the
# same bytes stored, but diff pruning's trained bar and its peak memory are far larger.

# %%
explorer = DensityExplorer(model="roberta-base", top_k=3, title="Trained, changed, stored, peak memory")
explorer

# %% [markdown]
# ## Memory: trained weights keep their inputs
#
# A trained weight needs its input for $\nabla_W = g^\top x$, so partial tuning keeps every trained linear's
# input; a trained bias needs only the output's gradient, so BitFit keeps nothing of its own. Both still save
# the backbone's activations from the lowest trained module up. FISH mask trains 0.5% of the block weights'
# entries but holds dense gradients and AdamW moments for all of them; diff pruning holds the weights, a dense
# delta and a dense gate, their gradients and their AdamW states.

# %%
for name, hp in (("lora", {}), ("bitfit", {}), ("ln_tuning", {}), ("partial", {"top_k": 3}), ("fish_mask", {}),
                 ("diff_pruning", {}), ("full", {})):
    e = estimate("roberta-base", name, hp, batch_size=8, seq_len=512)
    print(f"{name:<10} trainable {e.trainable_params:>12,}  activations {format_bytes(e.activations):>9}  "
          f"peak {format_bytes(e.total):>9}")

# %% [markdown]
# ## What the surveys report
#
# Lialin et al. v1 (text, via a transcription; see `data/catalogue_sources.md`) say BitFit updates about
# 0.05% of the parameters, diff pruning changes 0.5% but trains 200% (a dense delta and a mask), FAR updates
# 6% of DistilBERT (FFN only). Our BitFit on roberta-base trains 0.123%, more than the paper's BERT figure
# because RoBERTa's masked-LM head has a 50,265-wide output bias (the cell below counts it both ways).
# Diff pruning's point is the gap between *changed* and *trained*: storage is small, memory is not (weights,
# a dense delta, the gate parameters, and AdamW states for both).

# %%
everything = three_way("roberta-base", "bitfit")
encoder_only = three_way("roberta-base", "bitfit", bias_modules=r"roberta\.(encoder\..*|embeddings\.LayerNorm)")
for label, row in (("every bias", everything), ("encoder biases only", encoder_only)):
    print(f"BitFit on roberta-base, {label}: {row['formula']:,} = {row['formula'] / row['total']:.3%} trained")

# %% [markdown]
# ## Summary
#
# Trained, changed after merging, and the smallest way to store one task (bf16 values), on Llama-2-7B and
# RoBERTa-base, for the selective methods beside full fine-tuning and LoRA. Every method of the
# registry has the same measurement (`footprint_table()` with no `methods` filter).
#
# * Selective methods change exactly what they train; whole-tensor ones store the changed tensors, masked ones
#   store values with their indices (COO).
# * LoRA trains little but, merged, changes whole matrices: store its own parameters instead.
# * BitFit is tiny on BERT-like models and impossible on Llama (no biases).
# * Diff pruning is parameter-efficient in storage (0.5% changed) but not in memory: it trains 200% of the weights
#   it targets. A mask's count is exact, yet its gradients and optimizer states stay dense.

# %%
print(format_footprints(footprint_table(methods=("full", "lora", "bitfit", "ln_tuning", "partial", "fish_mask",
                                                 "lt_sft", "child_tuning", "diff_pruning"))))
