# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 04 — Reparameterized methods: LoRA and its family
#
# Reparameterized methods leave the pretrained weight $W_0$ frozen and train its *update* in a
# low-dimensional form. Once trained, the update can be folded into $W_0$, so the fine-tuned model runs
# exactly as fast as the base model. LoRA (Hu et al. 2021, arXiv:2106.09685) is the founding member and
# the most used PEFT method.
#
# ## The idea
#
# For a frozen linear layer $h = W_0 x$ with $W_0 \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$, LoRA
# learns $\Delta W = B A$ with $B \in \mathbb{R}^{d_\text{out} \times r}$ and $A \in \mathbb{R}^{r \times d_\text{in}}$, $r \ll \min(d_\text{in}, d_\text{out})$:
#
# $$h = W_0 x + \frac{\alpha}{r}\, B A x .$$
#
# * **Initialisation.** $A$ starts like a default linear layer and $B = 0$, so $\Delta W = 0$: step 0 is
#   the pretrained model.
# * **Scale.** $\alpha / r$ keeps the update's size roughly independent of $r$ when $\alpha$ is fixed
#   (rsLoRA uses $\alpha/\sqrt{r}$).
# * **Cost.** Each adapted layer trains $r\,(d_\text{in} + d_\text{out})$ parameters instead of
#   $d_\text{in} d_\text{out}$.
# * **Merging.** $W = W_0 + \frac{\alpha}{r} B A$ after training: no inference overhead.

# %%
# %matplotlib widget
import inspect

from IPython.display import Code, Markdown, display

from survey_utils.counting import format_rows, three_way
from survey_utils.methods import get_method
from survey_utils.methods.reparameterized import LoRALinear
from survey_utils.parity import parity
from survey_utils.widgets import MethodExplorer

lora = get_method("lora")

# %% [markdown]
# ## Where LoRA sits in the three surveys
#
# The registry records each method's place in each survey's taxonomy.

# %%
display(Markdown(
    "| survey | place in its taxonomy |\n|---|---|\n"
    f"| Xu et al. 2023 (arXiv 2312.12148) | {lora.taxonomy.xu} |\n"
    f"| Wang et al. 2024 (arXiv 2410.19878) | {lora.taxonomy.wang} |\n"
    f"| Lialin et al. 2023 (arXiv 2303.15647) | Venn region {lora.taxonomy.lialin} (reparametrization-based) |"
))

# %% [markdown]
# ## LoRA from scratch
#
# The whole layer, as `survey_utils` defines it: a frozen base layer, two factors, a scale, and merge
# and unmerge. GPT-2's `Conv1D` stores its weight transposed (`fan_in_fan_out`), which is why
# `delta_weight` transposes for it.

# %%
display(Code(inspect.getsource(LoRALinear), language="python"))

# %% [markdown]
# `apply` wraps every target layer and freezes the rest; the closed form is one line of arithmetic over
# the layers the targets select:

# %%
display(Code(inspect.getsource(lora.trainable_params), language="python"))

# %% [markdown]
# ## Check 1 — three counts agree
#
# The closed form (arithmetic on the config), our built model (on the `meta` device, so a 70B model costs
# nothing) and HF peft's `get_nb_trainable_parameters()` must give the same number.

# %%
rows = [three_way(model, "lora", r=8, target_modules=["q_proj", "v_proj"])
        for model in ["llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "llama-2-70b"]]
rows += [three_way("gpt2", "lora", r=8), three_way("roberta-base", "lora", r=8), three_way("t5-base", "lora", r=8)]
print(format_rows(rows))
assert all(row["match"] for row in rows)

# %% [markdown]
# ## Check 2 — same outputs as peft, and merging changes nothing
#
# On tiny models with real tensors we give our factors and peft's the same (non-zero) values and compare
# the outputs; then we merge $\frac{\alpha}{r}BA$ into $W_0$ and compare again.

# %%
for model in ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"]:
    report = parity(model, "lora", r=4, lora_alpha=16.0)
    print(f"{model:<11} tensors copied {report.copied_tensors:>3}   max |ours - peft| = {report.max_diff_vs_peft:.1e}"
          f"   max |merged - unmerged| = {report.max_diff_merged:.1e}   {'match' if report.ok else 'MISMATCH'}")
    assert report.ok

# %% [markdown]
# ## Explore: rank, targets, layers, model
#
# Move the rank slider, tick target modules, narrow the block range or pick another model. The left panel
# sweeps the rank for your targets (the black dot is your choice; right axis: % of the model); the right
# panel compares the methods of this chapter on the same model. Invalid settings (no target ticked, a
# module the model lacks) show a one-line message above the plot.

# %%
explorer = MethodExplorer(["lora", "full"], model="llama-2-7b", title="LoRA: trainable parameters")
explorer

# %% [markdown]
# The explorer's state is plain Python, so the same numbers are one call away, here with targets on every
# linear layer of Llama-2-7B, the setting QLoRA popularised:

# %%
all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
print(format_rows([three_way("llama-2-7b", "lora", r=r, target_modules=all_linear) for r in (8, 64)]))

# %% [markdown]
# ## Summary
#
# * LoRA trains $r(d_\text{in}+d_\text{out})$ parameters per adapted layer; on Llama-2-7B with $r=8$ on
#   `q_proj` and `v_proj` that is 4,194,304 parameters, 0.062% of the model — the same number three ways.
# * Its outputs equal peft's bit for bit in float64, and merging leaves them unchanged: no inference cost.
# * Parameter-efficient is not memory-efficient by itself: activations and frozen weights still dominate
#   (chapter 00's memory model).
#
# ## Exercises
#
# 1. For which rank does LoRA on every linear layer of Llama-2-7B train 1% of the model? Use the explorer,
#    then check with `three_way`.
# 2. GPT-2 fuses $q, k, v$ into one `c_attn` layer. How does that change the count against Llama's separate
#    projections at the same rank?
# 3. Why must $B$, not $A$, start at zero? What would happen with both at zero?
