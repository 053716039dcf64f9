# %% [markdown]
# # Chapter 08 — Multi-task PEFT: sharing what several tasks learned
#
# Every method so far adapts a model to *one* task. Wang et al. 2024 (arXiv 2410.19878) give a sixth family,
# **multi-task** PEFT (AdapterFusion, AdaMix, MOELoRA, LoRAHub, SPoT, ATTEMPT, MPT): methods that serve many
# tasks with modules they share, route between or compose. Their question is not "how few parameters for a
# task?" but "what does *one more task* cost, and does sharing help the tasks?".
#
# This chapter implements two of them from scratch and checks both against HF peft:
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
#
# Both need to know each example's task: their forward takes `task_ids`, one index per example, as peft's do.

# %%
# %matplotlib widget
import inspect

from IPython.display import Code, Markdown, display

from survey_utils.counting import format_rows, three_way
from survey_utils.methods import get_method, list_methods
from survey_utils.methods.layers.multi_task import MultitaskPromptEmbedding, PolyLinear
from survey_utils.parity import parity

FAMILY = [m.name for m in list_methods() if m.tasks_hp is not None]
display(Markdown("| method | Xu et al. 2023 | Wang et al. 2024 | Lialin et al. 2023 | parameter counting the tasks |\n"
                 "|---|---|---|---|---|\n" + "\n".join(
                     f"| {get_method(m).title} | {get_method(m).taxonomy.xu} | {get_method(m).taxonomy.wang} | "
                     f"{get_method(m).taxonomy.lialin} | `{get_method(m).tasks_hp}` |" for m in FAMILY)))

# %% [markdown]
# Wang et al. name MPT in their multi-task family; Polytropon is in none of the three taxonomies (peft ships it,
# which is why it is here). `data/catalogue.csv` records where each was looked for.
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
# ## Check 1 — three counts agree
#
# Closed form, our model built on `meta`, and peft's `get_nb_trainable_parameters()`, with 8 tasks. Poly adapts
# `nn.Linear` only, like peft's, so GPT-2's `Conv1D` is refused (one line) and GPT-2 is not in its rows.

# %%
rows = [three_way(model, "mpt", num_tasks=8) for model in ["llama-2-7b", "gpt2", "roberta-base", "t5-base"]]
rows += [three_way(model, "poly", n_tasks=8) for model in ["llama-2-7b", "roberta-base", "t5-base"]]
print(format_rows(rows))
assert all(row["match"] for row in rows)

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
# ## What one more task costs
#
# One LoRA per task adds a whole LoRA per task; MPT adds two thin factors, Poly a row of logits per layer. The
# explorer sets each beside one LoRA per task at the same rank: trainable parameters for all $T$ tasks, stored
# bytes per task (shared modules amortise over tasks, LoRAs do not), and the peak memory of a training step.
# The skills slider is live for methods with skills; a setting that does not fit shows one line above the plot.

# %%
from survey_utils.widgets.task_scaling import TaskScalingExplorer

scaling = TaskScalingExplorer(model="llama-2-7b", method="mpt")
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
# **The runs.** One LoRA ($r=8$, `q_proj`/`v_proj`) per task, 150 steps of 32 examples each. MPT ($n=8$, rank 1)
# and Poly ($r=8$, 4 skills) trained jointly on the first three tasks (the same 150 steps' worth of examples
# per task), then the fourth task *added* by training only its own row (MPT's $U_4, V_4$; Poly's row of $Z$ in
# every layer), all shared parameters frozen. The main job (`make figures`) runs the script; the chapter reads
# what it wrote:

# %%
from survey_utils.experiments.ch08_multi_task import load_results, per_task_cost, plot_results

results = load_results()
print("command:", results[0]["command"])
print(f"{'method':<6}{'task':<7}{'phase':<13}{'trainable':>11}{'per added task':>16}{'loss':>8}{'accuracy':>10}")
for row in results:
    print(f"{row['method']:<6}{row['task']:<7}{row['phase']:<13}{int(row['trainable_params']):>11,}"
          f"{int(row['params_per_added_task']):>16,}{float(row['eval_loss']):>8.3f}{float(row['eval_accuracy']):>10.3f}")
plot_results(results)

# %% [markdown]
# ## Summary
#
# * MPT and Polytropon serve $T$ tasks with one set of modules: a task adds $nr + rd$ parameters (MPT) or $S$
#   per layer (Poly) instead of a whole LoRA. Counts equal peft's three ways; outputs equal peft's.
# * Sharing changes what a task can learn, not only what it costs: read the measured table above for which
#   tasks each method fits on this small random backbone, and the per-task cost table below for what the last
#   task cost.
# * The surveys' other multi-task methods (AdapterFusion, LoRAHub, MOELoRA, ATTEMPT, SPoT) and peft's X-LoRA are
#   not implemented yet in this book.
#
# The per-task cost table, from `data/multi_task_results.csv`:

# %%
cost = per_task_cost(results)
print(f"{'method':<8}{'params per added task':>22}{'steps on it':>13}{'its accuracy':>14}{'mean accuracy':>15}")
for row in cost:
    print(f"{row['method']:<8}{row['params per added task']:>22,}{row['steps on the new task']:>13}"
          f"{row['new task accuracy']:>14.3f}{row['mean accuracy, all tasks']:>15.3f}")
