# %% [markdown]
# # Chapter 03 — Selective methods: BitFit, LN tuning, partial fine-tuning
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
# Lialin et al. insist on three different counts: parameters **trained**, parameters **changed** once the
# update is applied, and bytes **stored** per task. A selective method changes exactly what it trains; LoRA
# trains little but, merged, rewrites whole matrices. This chapter measures all three.

# %%
# %matplotlib widget
import inspect

from IPython.display import Code, Markdown, display

from survey_utils.counting import format_rows, three_way
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch03_selective import footprint_table, format_footprints, train_and_compare
from survey_utils.memory import estimate
from survey_utils.methods import list_methods
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
# ## Check 1 — three counts agree
#
# The closed form, our method applied to the model built on `meta`, and peft where peft has the method
# (LN tuning). peft has no BitFit; its BEFT adds a new bias vector to chosen linears instead (tested in
# `tests/methods/test_selective.py`: same count and same outputs as our BitFit on the value biases).

# %%
rows = [three_way(model, m.name) for model in ("roberta-base", "t5-base") for m in selective
        if not (m.name == "bitfit" and model == "t5-base")]
rows.append(three_way("t5-base", "partial", top_k=12, components="cross_attention"))
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
                          ("llama-2-7b", "partial", {"components": "cross_attention"})):
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
                          ("tiny-t5", "partial", {"top_k": 2, "components": "cross_attention"})):
    r = train_and_compare(model, method, steps=3, **hp)
    print(f"{model:<11}{method:<10} trained {r.trained:>8,}  changed {r.changed:>8,}  frozen {r.frozen:>9,}  "
          f"frozen bit-identical: {r.frozen_identical}")

# %% [markdown]
# ## Explore: density, k, components
#
# The selective method (left of each pair) beside LoRA on the query and value projections at the rank whose
# trainable count is closest. Move `top_k`: partial tuning's trained and changed bars move together; LoRA's
# changed bar is every element of every q and v matrix. Pick BitFit on a Llama model: the message says why
# it cannot apply.

# %%
explorer = DensityExplorer(model="roberta-base", top_k=3, title="Trained, changed, stored, peak memory")
explorer

# %% [markdown]
# ## Memory: trained weights keep their inputs
#
# A trained weight needs its input for $\nabla_W = g^\top x$, so partial tuning keeps every trained linear's
# input; a trained bias needs only the output's gradient, so BitFit keeps nothing of its own. Both still save
# the backbone's activations from the lowest trained module up.

# %%
for name, hp in (("lora", {}), ("bitfit", {}), ("ln_tuning", {}), ("partial", {"top_k": 3}), ("full", {})):
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
# * Selective methods change exactly what they train, and store it as the changed tensors.
# * LoRA trains little but, merged, changes whole matrices: store its own parameters instead.
# * BitFit is tiny on BERT-like models and impossible on Llama (no biases).

# %%
print(format_footprints(footprint_table(methods=("full", "lora", "bitfit", "ln_tuning", "partial"))))
