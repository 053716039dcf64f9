# %% [markdown]
# # Chapter 08 — Multi-task PEFT: sharing what several tasks learned
#
# Every method so far adapts a model to *one* task. Wang et al. 2024 (arXiv 2410.19878) give a sixth family,
# **multi-task** PEFT (AdapterFusion, AdaMix, MOELoRA, LoRAHub, SPoT, ATTEMPT, MPT): methods that serve many
# tasks with modules they share, route between or compose. Their question is not "how few parameters for a
# task?" but "what does *one more task* cost, and does sharing help the tasks?".
#
# This chapter implements eight of them from scratch. MPT, Polytropon and SPoT are checked against HF peft (counts and
# outputs) like every chapter's methods; X-LoRA too, by a check of its own (peft builds it from LoRA adapters saved
# on disk). peft has neither AdapterFusion, MOELoRA, LoRAHub nor ATTEMPT, and AdapterHub's `adapters` (which has
# AdapterFusion) pins transformers 4.57 while this book runs transformers 5, so those four are checked closed form
# against the built model, with AdapterHub's defaults (adapters 1.3.0) or the authors' code transcribed:
#
# * **Multitask prompt tuning** (MPT, Wang et al. 2023, arXiv:2303.02861): one prompt $P^\ast \in
#   \mathbb{R}^{n\times d}$ shared by all tasks, rescaled per task by a low-rank matrix,
#   $$P_k = P^\ast \odot (U_k V_k), \qquad U_k \in \mathbb{R}^{n\times r},\ V_k \in \mathbb{R}^{r\times d}.$$
#   A task adds $nr + rd$ parameters (the paper's rank one: $n + d$).
# * **Polytropon** (Poly, Ponti et al. 2023, arXiv:2202.13914): in each adapted layer an inventory of $S$ LoRA
#   *skills* $(A_s, B_s)$ and a task-skill allocation $Z \in \mathbb{R}^{T\times S}$; task $k$ uses
#   $$h = W_0 x + \tfrac{1}{r}\, x \Big(\sum_s w_{ks} A_s\Big)\Big(\sum_s w_{ks} B_s\Big),\qquad
#   w_{ks} = \frac{z_{ks}}{\sum_{s'} z_{ks'}},$$
#   with $z_{ks}$ a relaxed Bernoulli sample of logit $Z_{ks}$ in training and $\sigma(Z_{ks})$ in evaluation.
#   A task adds $S$ numbers per layer.
# * **AdapterFusion** (Pfeiffer et al. 2021, arXiv:2005.00247): $N$ adapters, trained one per task and then
#   frozen, and at each adapter site a learned attention over their outputs $u_n = \mathrm{adapter}_n(h)$,
#   $$y = h + \sum_n a_n V u_n,\qquad a = \operatorname{softmax}_n\big((Qh)^\top K u_n\big),$$
#   $3d^2 + 2d$ trainable per site whatever $N$ (AdapterHub's default "dynamic" fusion, $V$ starting at $I$).
# * **MOELoRA** (Liu et al. 2024, arXiv:2310.18339): $E$ LoRA experts of rank $r/E$ per layer and a gate on a
#   learned task embedding $t_k \in \mathbb{R}^e$,
#   $$h = W_0x + \tfrac{\alpha}{r}\sum_e \omega_{ke} B_eA_ex,\qquad \omega_k = \operatorname{softmax}(G t_k).$$
#   A task adds $e$ numbers per layer.
# * **LoRAHub** (Huang et al. 2023, arXiv:2307.13269): $N$ LoRA modules trained on other tasks, frozen, summed
#   with weights found *without gradients*,
#   $$h = W_0x + \tfrac{\alpha}{r}\sum_n w_n B_nA_nx,\qquad w = \arg\min_w\ L(w) + 0.05\,\overline{|w|}.$$
#   The paper searches with CMA-ES; we use a (1+1) evolution strategy (one candidate a step, one-fifth rule).
# * **SPoT** (Vu et al. 2022, arXiv:2110.07904): prompt tuning whose prompt *starts* from a source task's trained
#   prompt, the one whose task embedding is closest to the target's (cosine of the average prompt token, the
#   target's embedding being a prompt trained briefly on it). The model and its count are prompt tuning's
#   (chapter 02, and peft's `PROMPT_TUNING`); what SPoT adds is the retrieval.
# * **ATTEMPT** (Asai et al. 2022, arXiv:2205.11961): $t$ source prompts trained beforehand (prompt tuning on each
#   source task) and frozen, a new target prompt, and a small attention module $G$ that mixes them *per example*
#   from the max-pooled input embeddings $\hat x$:
#   $$H = \mathrm{LN}\big(W_\text{up}\,\mathrm{SiLU}(W_\text{down}\hat x)\big),\quad
#   a_j = \operatorname{softmax}_j\big(\hat P_j \cdot H / T\big),\quad
#   P = P_\text{target} + \sum_{j=1}^{t+1} a_j P_j,$$
#   $\hat P_j$ the max-pooled prompt, $j$ over the sources *and* the target. Trainable: $nd + 2rd$ whatever $t$.
#   Transcribed from the authors' code (AkariAsai/ATTEMPT, `modeling_t5.py`, `attn_method="sub"`): $r = 100$, no
#   biases, $T = d \cdot e$ (their configs' 2087 for $d = 768$), and a LayerNorm their training loop never unfreezes,
#   so it has no parameters here.
# * **X-LoRA** (Buehler & Buehler 2024, arXiv:2402.07148): $N$ LoRA experts trained beforehand and frozen in every
#   adapted layer $\ell$, mixed per *token* by scalings a classifier predicts from the last hidden state $z_t$ of a
#   first forward pass (experts off),
#   $$h = W_0x + \tfrac{\alpha}{r}\sum_n B_nA_n\big(\lambda_{\ell n}(t)\,x\big),\qquad
#   \lambda(t) = \operatorname{softmax}\big(\mathrm{MLP}(z_t)/\tau\big).$$
#   Every step runs the model twice (the first pass without gradients). peft's default classifier is one linear
#   layer: $(h+1)N$ trainable parameters.
#
# MPT, Poly and MOELoRA need each example's task: their forward takes `task_ids`, one index per example, as
# peft's do. AdapterFusion, LoRAHub, ATTEMPT and X-LoRA serve one new task from modules trained on other tasks.

# %%
# %matplotlib widget
import inspect

from IPython.display import Code, Markdown, display

from survey_utils.architecture import total_params
from survey_utils.counting import format_rows, three_way
from survey_utils.methods import get_method, list_methods
from survey_utils.methods.layers.multi_task import (
    AdapterFusionLayer,
    AttemptPromptEmbedding,
    LoraHubLinear,
    MoELoRALinear,
    MultitaskPromptEmbedding,
    PolyLinear,
    XLoraContext,
    XLoraLinear,
    prompt_similarity,
    transfer_prompt,
)
from survey_utils.parity import parity
from survey_utils.zoo import load_config

FAMILY = [m.name for m in list_methods() if m.chapter == "08_multi_task"]
display(Markdown("| method | Xu et al. 2023 | Wang et al. 2024 | Lialin et al. 2023 | parameter counting the tasks |\n"
                 "|---|---|---|---|---|\n" + "\n".join(
                     f"| {get_method(m).title} | {get_method(m).taxonomy.xu} | {get_method(m).taxonomy.wang} | "
                     f"{get_method(m).taxonomy.lialin} | `{get_method(m).tasks_hp or '(one task)'}` |" for m in FAMILY)))

# %% [markdown]
# Wang et al. name MPT, AdapterFusion, MOELoRA, LoRAHub, SPoT and ATTEMPT in their multi-task family (Lialin et al.
# put SPoT with the soft prompts); Polytropon and X-LoRA are in none of the three taxonomies (peft ships both, which
# is why they are here). `data/catalogue.csv` records where each was
# looked for.
#
# ## From scratch
#
# MPT's prompt module: the shared table and each example's task factors (the soft-prompt hook of chapter 02
# prepends it to the input):

# %%
display(Code(inspect.getsource(MultitaskPromptEmbedding.task_prompts), language="python"))

# %% [markdown]
# Polytropon's layer: each example's skill weights mix the skills' $A$ and $B$, then a LoRA-shaped update:

# %%
display(Code(inspect.getsource(PolyLinear.allocation), language="python"))
display(Code(inspect.getsource(PolyLinear.forward), language="python"))

# %% [markdown]
# AdapterFusion's attention over the frozen adapters' outputs, MOELoRA's task-conditioned gate, and LoRAHub's
# composed update (what its search weighs):

# %%
display(Code(inspect.getsource(AdapterFusionLayer.attention), language="python"))
display(Code(inspect.getsource(MoELoRALinear.gate), language="python"))
display(Code(inspect.getsource(LoraHubLinear.delta), language="python"))

# %% [markdown]
# SPoT's retrieval: the source prompt most similar to the target's probe prompt becomes the starting point.

# %%
display(Code(inspect.getsource(prompt_similarity), language="python"))
display(Code(inspect.getsource(transfer_prompt), language="python"))

# %% [markdown]
# ATTEMPT's attention module and instance prompt (the soft-prompt hook prepends it; a pre-hook pools the input first):

# %%
display(Code(inspect.getsource(AttemptPromptEmbedding.attention), language="python"))
display(Code(inspect.getsource(AttemptPromptEmbedding.forward), language="python"))

# %% [markdown]
# X-LoRA's layer: each expert reads the input scaled by its token's scaling for this layer (top-k where asked):

# %%
display(Code(inspect.getsource(XLoraContext.for_layer), language="python"))
display(Code(inspect.getsource(XLoraLinear.forward), language="python"))

# %% [markdown]
# ## Check 1 — three counts agree
#
# Closed form, our model built on `meta`, and peft's `get_nb_trainable_parameters()`, with 8 tasks (8 source
# modules for AdapterFusion, LoRAHub, ATTEMPT and X-LoRA; X-LoRA's peft column comes in check 3). Poly adapts `nn.Linear` only, like peft's, so GPT-2's `Conv1D` is
# refused (one line) and GPT-2 is not in its rows. `peft` is n/a where peft lacks the method. The `total`
# column includes what a method adds frozen: AdapterFusion's eight adapters, LoRAHub's eight LoRAs, ATTEMPT's
# eight prompts, X-LoRA's eight experts. Note
# AdapterFusion's size on a wide model: $3d^2 + 2d$ per block, a large share of Llama-2-7B's own parameters
# (printed under the table).

# %%
rows = [three_way(model, "mpt", num_tasks=8) for model in ["llama-2-7b", "gpt2", "roberta-base", "t5-base"]]
rows += [three_way(model, "poly", n_tasks=8) for model in ["llama-2-7b", "roberta-base", "t5-base"]]
rows += [three_way("roberta-base", "moelora", n_tasks=8)]
rows += [three_way(model, "adapter_fusion", num_sources=8) for model in ["llama-2-7b", "roberta-base"]]
rows += [three_way("roberta-base", "lorahub", num_sources=8)]
rows += [three_way("gpt2", "spot")]
rows += [three_way(model, "attempt", num_sources=8) for model in ["t5-base", "llama-2-7b"]]
rows += [three_way(model, "xlora", num_adapters=8) for model in ["mistral-7b", "roberta-base"]]
print(format_rows(rows))
assert all(row["match"] for row in rows)
fusion = next(r for r in rows if r["method"] == "adapter_fusion" and r["model"] == "llama-2-7b")
print(f"AdapterFusion's trainable fusion on llama-2-7b: {fusion['formula']:,} parameters, "
      f"{100 * fusion['formula'] / total_params(load_config('llama-2-7b')):.1f}% of the base model")

# %% [markdown]
# ## Check 2 — same outputs as peft, with different tasks in one batch
#
# Float64 tiny models, three tasks, the two examples of the batch from different tasks. peft's MPT prompt is
# float32 (it builds its own), so that difference is float32 rounding. peft 0.21.2's MPT forward fails on BERT
# (its feature-extraction forward drops `task_ids`) and on T5 (its seq2seq branch drops `decoder_input_ids`):
# MPT is compared on the decoder-only models, Poly on all three linear-layer models.

# %%
for name, models in (("mpt", ["tiny-llama", "tiny-gpt2"]), ("poly", ["tiny-llama", "tiny-bert", "tiny-t5"])):
    for model in models:
        report = parity(model, name, **{get_method(name).tasks_hp: 3})
        print(f"{name:<5}{model:<11} tensors copied {report.copied_tensors:>3}   "
              f"max |ours - peft| = {report.max_diff_vs_peft:.1e}   {'match' if report.ok else 'MISMATCH'}")
        assert report.ok

# %% [markdown]
# A task id the model does not serve is refused in one line, before any layer runs:

# %%
import torch

from survey_utils.counting import apply_method
from survey_utils.errors import SurveyError
from survey_utils.zoo import build_model

tiny_poly = apply_method(build_model("tiny-llama"), "poly", n_tasks=3)
try:
    tiny_poly(input_ids=torch.tensor([[5, 6, 7]]), task_ids=torch.tensor([3]))
except SurveyError as error:
    print("SurveyError:", error)

# %% [markdown]
# ## Check 3 — X-LoRA against peft's XLoraModel
#
# peft builds X-LoRA from LoRA adapters saved on disk (and refuses a config with `use_cache` on), so it cannot be
# built from a config on `meta` like the table above. Here each expert is a LoRA saved with peft into a temporary
# folder; peft's model is built over them on tiny-llama (float64), its classifier and experts are copied into ours,
# and one batch goes through both. peft 0.21.2 loads the experts only where the backbone is `model.` (Llama-like):
# it rewrites every saved key to `model.model.<...>`, so GPT-2's and BERT's experts come back as unexpected keys
# (ours runs there; the test suite pins peft's error).

# %%
from survey_utils.experiments.ch08_multi_task import xlora_against_peft

xrows = [xlora_against_peft(), xlora_against_peft(num_adapters=3, layerwise_scalings=True, xlora_depth=3,
                                                  xlora_size=16, top_k_lora=2)]
print(format_rows(xrows))
for row in xrows:
    print(f"peft total {row['peft_total']:,} (ours {row['total']:,}); tensors copied {row['copied']:>3}   "
          f"max |ours - peft| = {row['max_diff']:.1e}   {'match' if row['max_diff'] < 1e-10 else 'MISMATCH'}")
assert all(row["match"] and row["max_diff"] < 1e-10 for row in xrows)

# %% [markdown]
# ## What one more task costs
#
# One LoRA per task adds a whole LoRA per task; MPT adds two thin factors, Poly a row of logits per layer, MOELoRA
# one task embedding per layer. AdapterFusion and LoRAHub are the other way round: their trained part does not
# grow with $N$, but every source is a whole module, trained beforehand and stored. The explorer sets each beside
# one reference module per task (`reference="lora"`, at the same rank): parameters *added* for all $T$ tasks
# (trained plus added frozen), stored bytes per task (shared modules amortise over tasks, per-task copies do
# not), and the peak memory of a training step. The skills / experts slider is live for methods with skills or
# experts; a setting that does not fit (more experts than the bound, a rank the experts cannot share) shows one
# line above the plot.

# %%
from survey_utils.widgets.task_scaling import TaskScalingExplorer

scaling = TaskScalingExplorer(model="llama-2-7b", method="mpt", reference="lora")
scaling

# %% [markdown]
# ## Measured: one LoRA per task against shared modules
#
# **The setting.** Four tasks made by code (`survey_utils/experiments/ch08_multi_task.py`, `make_task`): six
# tokens drawn uniformly from a 16-symbol alphabet; the answer, one of four label tokens read at the last
# position, is the first symbol mod 4 (`first`), the last mod 4 (`last`), their sum mod 4 (`sum`) or the
# largest symbol divided by 4 (`max`). Same inputs, different rules: what multi-task methods are built for.
# The backbone is the zoo's `tiny-llama` at random initialisation (the zoo has no pretrained weights).
#
# **The runs.** One LoRA ($r=8$, `q_proj`/`v_proj`), one Pfeiffer adapter (AdapterHub's defaults) and one prompt
# (prompt tuning, $n=8$) per task, 150 steps of 32 examples each. MPT ($n=8$, rank 1), Poly ($r=8$, 4 skills) and MOELoRA ($r=8$, 4 experts)
# trained jointly on the first three tasks (the same 150 steps' worth of examples per task), then the fourth
# task *added* by training only its own row (MPT's $U_4, V_4$; Poly's row of $Z$ and MOELoRA's task embedding in
# every layer), all shared parameters frozen. AdapterFusion learns the fourth task with a fusion over the first
# three tasks' Pfeiffer adapters (150 steps); LoRAHub composes the first three tasks' LoRAs, its three weights
# searched in 40 loss evaluations on 64 examples, no gradient. ATTEMPT ($n=8$, the authors' $r$ and $T$) learns it
# from the first three tasks' prompts (its target prompt starting from the first, as the authors' code does), and
# X-LoRA's classifier from the first three tasks' LoRAs, 150 steps each. The main job (`make figures`) runs the
# script; the chapter reads what it wrote:

# %%
from survey_utils.experiments.ch08_multi_task import load_results, per_task_cost, plot_results

results = load_results()
print("command:", results[0]["command"])
print(f"{'method':<16}{'task':<7}{'phase':<13}{'trainable':>11}{'per added task':>16}{'loss':>8}{'accuracy':>10}")
for row in results:
    print(f"{row['method']:<16}{row['task']:<7}{row['phase']:<13}{int(row['trainable_params']):>11,}"
          f"{int(row['params_per_added_task']):>16,}{float(row['eval_loss']):>8.3f}{float(row['eval_accuracy']):>10.3f}")
plot_results(results)

# %% [markdown]
# One reference line for the added task: `max` is skewed towards its last label (six symbols, one of them usually
# 12 or more). A method that always answers that label scores the rate printed below; compare the prompt-based rows
# (prompt tuning, MPT, ATTEMPT) on `max` with it.

# %%
from survey_utils.experiments.ch08_multi_task import TASKS, make_task

_, labels = make_task(TASKS[-1], 512, seed=1)  # the held-out examples `evaluate` scores
print(f"majority-label rate on '{TASKS[-1]}' (held-out): {float((labels == labels.mode().values).float().mean()):.4f}")

# %% [markdown]
# ## Summary
#
# * MPT, Polytropon and MOELoRA serve $T$ tasks with one set of modules: a task adds $nr + rd$ parameters (MPT),
#   $S$ (Poly) or $e$ (MOELoRA) per layer instead of a whole LoRA. MPT's and Poly's counts equal peft's three ways
#   and their outputs equal peft's; MOELoRA is in no library, so its count is checked closed form vs built model.
# * AdapterFusion and LoRAHub reuse modules trained one per task: the fusion's $3d^2 + 2d$ per site is the
#   price of a new target task (more than a LoRA on a small model), LoRAHub's is $N$ numbers and a few dozen
#   forward passes, but every source is a whole stored module.
# * Sharing changes what a task can learn, not only what it costs: read the measured table above for which
#   tasks each method fits on this small random backbone, and the per-task cost table below for what the last
#   task cost.
# * SPoT costs what prompt tuning costs ($nd$ per task, peft's count); it changes where a task's prompt starts.
# * ATTEMPT trains a target prompt and a small attention module ($nd + 2rd$, whatever the number of sources) over
#   frozen source prompts; each source adds a frozen prompt. X-LoRA trains only a classifier ($(h+1)N$ by peft's
#   default) over frozen LoRA experts, at the price of a second forward pass every step; its counts and outputs
#   equal peft's.
# * AdaMix, the one method of Wang et al.'s multi-task list not in this chapter, is a mixture of adapters averaged
#   into one for inference: chapter 05 builds it with the unified methods.
#
# The per-task cost table, from `data/multi_task_results.csv`:

# %%
cost = per_task_cost(results)
print(f"{'method':<16}{'params per added task':>22}{'steps on it':>13}{'its accuracy':>14}{'mean accuracy':>15}")
for row in cost:
    print(f"{row['method']:<16}{row['params per added task']:>22,}{row['steps on the new task']:>13}"
          f"{row['new task accuracy']:>14.3f}{row['mean accuracy, all tasks']:>15.3f}")
