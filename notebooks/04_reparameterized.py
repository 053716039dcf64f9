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
from survey_utils.methods.layers.lowrank import LoRALinear
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
# A slider is a plain value: setting it from code runs the same callback as dragging it, and the black dot
# of the plot above moves. Doubling the rank doubles the count, as $r(d_\text{in} + d_\text{out})$ says
# (the slider is put back afterwards):

# %%
start = explorer.current_point.get_ydata()[0]
explorer.hp_controls["r"].value = 16
moved = explorer.current_point.get_ydata()[0]
explorer.hp_controls["r"].value = 8
print(f"r=8: {start:,.0f} trainable -> r=16: {moved:,.0f} (the plot redrew {explorer.updates} times so far)")
assert moved == 2 * start

# %% [markdown]
# The explorer's state is plain Python, so the same numbers are one call away, here with targets on every
# linear layer of Llama-2-7B, the setting QLoRA popularised:

# %%
all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
print(format_rows([three_way("llama-2-7b", "lora", r=r, target_modules=all_linear) for r in (8, 64)]))

# %% [markdown]
# # Beyond LoRA: the family
#
# LoRA's derivatives change one thing each: how the update is parameterised, how its scale is set, or
# how its rank is spent. All of them keep $W_0$ frozen and all of them merge into $W_0$ after training.
#
# | method | update of a $d_\text{out}\times d_\text{in}$ layer | trainable per layer | paper |
# |---|---|---|---|
# | rsLoRA | $\frac{\alpha}{\sqrt r} B A$ | $r(d_\text{in}+d_\text{out})$ | Kalajdzievski 2023, arXiv:2312.03732 |
# | DoRA | $W' = m \odot \dfrac{W_0 + \frac{\alpha}{r}BA}{\lVert W_0 + \frac{\alpha}{r}BA\rVert_c}$ | $r(d_\text{in}+d_\text{out}) + d_\text{out}$ | Liu et al. 2024, arXiv:2402.09353 |
# | AdaLoRA | $\frac{\alpha}{r_0} P\,\mathrm{diag}(\lambda)\,Q$, low-importance $\lambda_i \to 0$ | $r_0(d_\text{in}+d_\text{out}+1)$ | Zhang et al. 2023, arXiv:2303.10512 |
# | VeRA | $\mathrm{diag}(b)\,B\,\mathrm{diag}(d)\,A$, A and B frozen, random, shared | $d_\text{out} + r$ | Kopiczko et al. 2024, arXiv:2310.11454 |
# | LoHa | $\frac{\alpha}{r}(W_{1a}W_{1b}) \odot (W_{2a}W_{2b})$ | $2r(d_\text{in}+d_\text{out})$ | Hyeon-Woo et al. 2022, arXiv:2108.06098 |
# | LoKr | $\frac{\alpha}{r} W_1 \otimes W_2$ (each factor full or rank $r$) | $ac + bd$ or $r(a+c) + r(b+d)$ | Yeh et al. 2024, arXiv:2309.14859 |
# | KronA | $s\,(A \otimes B)$ | $a_1a_2 + b_1b_2$ | Edalati et al. 2022, arXiv:2212.10650 |
#
# * **rsLoRA** changes only the scale: with $\alpha/r$ the update shrinks as $r$ grows, with $\alpha/\sqrt r$
#   its size is stable, so larger ranks actually help.
# * **DoRA** splits each output row of the weight into a magnitude $m$ and a direction, and lets LoRA move the
#   direction. The norm $\lVert\cdot\rVert_c$ is taken per output feature over the inputs (peft's
#   `norm(dim=1)` of the $d_\text{out}\times d_\text{in}$ weight) and is *detached*: it follows $\Delta W$ but
#   passes no gradient (the paper's section 4.3). Every step recomputes $W_0 + BA$ at full size for the norm.
# * **AdaLoRA** writes the update as an SVD, $P\,\mathrm{diag}(\lambda)\,Q$, keeps $P$ and $Q$ near-orthogonal
#   with a penalty $\lVert P^\top P - I\rVert_F + \lVert QQ^\top - I\rVert_F$, scores each triplet by the
#   smoothed sensitivity $|w\,\partial L/\partial w|$ times its uncertainty, and zeroes the lowest $\lambda_i$
#   across *all* layers as a budget falls from $r_0$ to $\bar r$ per layer on a cubic schedule.
# * **VeRA** shares one pair of frozen random matrices between all layers and trains only two vectors per
#   layer ($d_\text{out} + r$ numbers): a few thousand per layer, a few hundred thousand for a whole 7B model
#   at its default $r = 256$ (printed below).
# * **LoHa** multiplies two rank-$r$ products element-wise: rank up to $r^2$ for twice LoRA's parameters.
# * **LoKr** and **KronA** use a Kronecker product: rank$(W_1\otimes W_2)$ = rank$(W_1)\,$rank$(W_2)$, so a few
#   hundred numbers can give a full-rank update. KronA never forms the product:
#   $(A\otimes B)\,x = \mathrm{vec}(A X B^\top)$ for $X$ the input reshaped to $a_2\times b_2$.

# %%
import matplotlib.pyplot as plt

from survey_utils.experiments.ch04_reparameterized import adalora_allocation, update_spectra
from survey_utils.figures.charts import stacked_terms
from survey_utils.memory.closed_form import estimate
from survey_utils.methods.layers import lowrank
from survey_utils.methods.layers.lowrank import DoRALinear

FAMILY = ["lora", "rslora", "dora", "adalora", "vera", "loha", "lokr", "krona"]
rows = [f"| {get_method(m).title} | {get_method(m).taxonomy.xu} | {get_method(m).taxonomy.wang} | "
        f"{get_method(m).taxonomy.lialin} |" for m in FAMILY]
display(Markdown("| method | Xu et al. 2023 | Wang et al. 2024 | Lialin et al. 2023 |\n|---|---|---|---|\n"
                 + "\n".join(rows)))

# %% [markdown]
# Only LoRA and KronA appear in all three taxonomies; Wang et al. list DoRA and AdaLoRA among the "LoRA
# derivatives"; VeRA, LoHa, LoKr and rsLoRA are in none of the three (`data/catalogue.csv` records where each
# was looked for).
#
# ## From scratch
#
# DoRA's forward is LoRA's plus two scalings per output feature (written like peft's, so the outputs match):

# %%
display(Code(inspect.getsource(DoRALinear.forward), language="python"))

# %% [markdown]
# LoKr and KronA differ in where the Kronecker factors come from and in how the product meets the input:

# %%
display(Code(inspect.getsource(lowrank.LoKrLinear.delta_weight), language="python"))
display(Code(inspect.getsource(lowrank.KronALinear.delta_output), language="python"))

# %% [markdown]
# AdaLoRA's budget, written from the paper's Algorithm 1 (and peft's `RankAllocator`):

# %%
display(Code(inspect.getsource(lowrank.RankAllocator.update_and_allocate), language="python"))

# %% [markdown]
# ## Check 1 — counts for Llama-2-7B, $r=8$ on `q_proj` and `v_proj`
#
# AdaLoRA at $r_0 = \bar r = 8$; VeRA at $r=8$ (its default is 256); KronA has no rank: its factor sides are
# near $\sqrt{4096} = 64$. KronA is not in peft, so only two columns can agree there.

# %%
LLAMA_R8 = {"lora": {"r": 8}, "rslora": {"r": 8}, "dora": {"r": 8}, "adalora": {"init_r": 8, "target_r": 8},
            "vera": {"r": 8}, "loha": {"r": 8}, "lokr": {"r": 8}, "krona": {}}
family_rows = [three_way("llama-2-7b", m, target_modules=["q_proj", "v_proj"], **hp) for m, hp in LLAMA_R8.items()]
print(format_rows(family_rows))
assert all(row["match"] for row in family_rows)

# %% [markdown]
# Two counts follow a peft convention worth knowing. **AdaLoRA** counts $P$, $Q$ and $\lambda$ at the
# *initial* rank $r_0$: pruning zeroes $\lambda_i$ but keeps the tensors, so memory and the count stay at $r_0$
# while the final update uses about $\bar r$ per layer (peft also keeps a frozen one-element `ranknum` per
# layer, which the total includes). **VeRA**'s shared $A$ and $B$ are buffers, not parameters, so no count
# includes their $r(\max d_\text{in} + \max d_\text{out})$ numbers, though they sit in memory:

# %%
from survey_utils.methods.reparameterized import adalora_effective_params, vera_projection_numel
from survey_utils.zoo import load_config

llama = load_config("llama-2-7b")
qv = {"target_modules": ["q_proj", "v_proj"]}
ada = get_method("adalora").resolve(llama, init_r=12, target_r=8, **qv)
print(f"AdaLoRA r0=12 -> 8: counted {get_method('adalora').count(llama, **ada):,}, "
      f"left after pruning {adalora_effective_params(llama, **ada):,}")
vera_hp = get_method("vera").resolve(llama, r=256, **qv)
print(f"VeRA r=256: trainable {get_method('vera').count(llama, **vera_hp):,}, "
      f"shared frozen buffers {vera_projection_numel(llama, **vera_hp):,} numbers")

# %% [markdown]
# ## Check 2 — same outputs as peft, and merged == unmerged
#
# Same recipe as for LoRA: equal non-zero adapter values in ours and peft's, float64, a tiny Llama (rsLoRA
# is LoRA's code with the other scale, checked above with `use_rslora`; the tests run every method on every
# tiny model). LoHa and LoKr are linear-only in peft (GPT-2's `Conv1D` is refused, by peft and by us).

# %%
FAMILY_HP = {"dora": {"r": 4, "lora_alpha": 12.0},
             "adalora": {"init_r": 6, "target_r": 2}, "vera": {"r": 16}, "loha": {"r": 4, "alpha": 3.0},
             "lokr": {"r": 2, "alpha": 3.0}}
for name, hp in FAMILY_HP.items():
    report = parity("tiny-llama", name, **hp)
    print(f"{name:<8} tensors copied {report.copied_tensors:>3}   max |ours - peft| = {report.max_diff_vs_peft:.1e}"
          f"   max |merged - unmerged| = {report.max_diff_merged:.1e}   {'match' if report.ok else 'MISMATCH'}")
    assert report.ok

# %% [markdown]
# ## Explore the family: parameters and memory
#
# The same explorer as above over the whole family: pick a method, its rank, targets and blocks, and a
# model. Below it, the memory of one training step for the family's methods (estimate; tick "simulate" to
# run it on fake tensors beside the estimate).

# %%
family_explorer = MethodExplorer(FAMILY, model="llama-2-7b", method="dora", title="The LoRA family: trainable parameters")
family_explorer

# %%
from survey_utils.widgets.memory import MemoryExplorer

memory_explorer = MemoryExplorer(methods=FAMILY, model="llama-2-7b", method="dora")
memory_explorer

# %% [markdown]
# What each method's own modules keep for backward is where the family differs most: DoRA keeps $W_0x$ and
# $BAx$ ($d_\text{out}$ wide, for the magnitude's gradient), VeRA keeps $Ax$ at its large rank and a
# $d_\text{out}$-wide product, LoHa and LoKr build the full-size update for every layer. Llama-2-7B, batch 1,
# 512 tokens, bf16, `q_proj` and `v_proj`, $r=8$ (VeRA at its default 256):

# %%
family_memory = {}
for name, hp in {**LLAMA_R8, "vera": {"r": 256}}.items():
    est = estimate("llama-2-7b", name, hp={**hp, **qv}, batch_size=1, seq_len=512)
    family_memory[name] = {k.removeprefix("method: "): v for k, v in est.activations_by_term.items()
                           if k.startswith("method: ")}
    print(f"{name:<8} peak {est.total / 2**30:6.2f} GiB   method's saved tensors "
          f"{sum(family_memory[name].values()) / 2**20:8.1f} MiB")
stacked_terms(family_memory, "MiB saved for backward by the method's modules (all adapted layers)",
              legend_title="tensor saved by the method (its memory term, per adapted layer)")

# %% [markdown]
# ## What rank can each form express? A short fit
#
# One `q_proj` of the tiny Llama ($128\times128$), a full-rank target update $\Delta^\star$, and three
# adapters at comparable sizes, each fitted for 50 Adam steps to reproduce $W_0 + \Delta^\star$. The singular
# values of each learned $\Delta W$: LoRA stops at $r$, LoHa at $r^2$, LoKr at rank$(W_1)\cdot$rank$(W_2)$.

# %%
import copy

from survey_utils.zoo import build_model

tiny = build_model("tiny-llama", seed=0)
q_proj = tiny.model.layers[0].self_attn.q_proj
adapters = {"LoRA r=4": LoRALinear(copy.deepcopy(q_proj), 4, 4.0),
            "LoHa r=2": lowrank.LoHaLinear(copy.deepcopy(q_proj), 2, 2.0),
            "LoKr r=8 (factor 4)": lowrank.LoKrLinear(copy.deepcopy(q_proj), 8, 8.0, decompose_factor=4)}
for adapter in adapters.values():
    adapter.base_layer.weight.requires_grad_(False)
spectra = update_spectra(q_proj, adapters, steps=50, samples=256)
with plt.ioff():
    fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
for name, result in spectra.items():
    values = [max(v, 1e-9) for v in result["singular_values"]]
    rank = sum(v > 1e-6 * values[0] for v in values)
    ax.semilogy(range(1, len(values) + 1), values, label=f"{name}: {result['params']} params, rank {rank}")
ax.semilogy(range(1, 129), spectra["LoRA r=4"]["target_singular_values"], "k:", label="target update")
ax.set_xlabel("singular value index")
ax.set_ylabel("singular value")
ax.set_ylim(1e-8, 2)
ax.legend(fontsize=8)
fig

# %% [markdown]
# ## AdaLoRA moves rank between layers
#
# A teacher is the tiny Llama with extra low-rank updates on `v_proj` only (none in block 0, rank 2, 4 and 8
# in blocks 1-3); a student with AdaLoRA on `q_proj` and `v_proj` ($r_0 = 8$, target $\bar r = 3$) learns to
# reproduce the teacher's hidden states for 30 steps. The allocator prunes the budget from 64 to 24 triplets
# and decides, across all eight layers at once, where they go. Read the final ranks printed below the plot:
# in our runs the `q_proj` adapters, which the teacher did not change, lose their rank first, while how the
# `v_proj` layers share the rest is noisier over so few steps (importance is estimated from gradients).

# %%
import torch

from survey_utils.counting import apply_method

teacher = build_model("tiny-llama", seed=0)
generator = torch.Generator().manual_seed(1)
with torch.no_grad():
    for block, rank in enumerate([0, 2, 4, 8]):
        v = teacher.model.layers[block].self_attn.v_proj.weight
        if rank:
            u, w = torch.randn(v.shape[0], rank, generator=generator), torch.randn(rank, v.shape[1], generator=generator)
            v += 0.5 * v.std() * (u @ w) / rank**0.5
student = apply_method(build_model("tiny-llama", seed=0), "adalora", init_r=8, target_r=3, lora_alpha=8.0,
                       total_step=30, tinit=4, tfinal=4)
batch = {"input_ids": torch.randint(0, tiny.config.vocab_size, (1, 16), generator=generator)}
history = adalora_allocation(student, batch, teacher, steps=30)
with plt.ioff():
    fig, (ax_heat, ax_budget) = plt.subplots(1, 2, figsize=(10, 3), width_ratios=(2, 1), layout="constrained")
image = ax_heat.imshow(torch.tensor(history["ranks"]).T, aspect="auto", cmap="viridis", vmin=0, vmax=8)
ax_heat.set_yticks(range(len(history["layers"])),
                   [name.removeprefix("model.layers.").replace(".self_attn.", " ") for name in history["layers"]])
ax_heat.set_xlabel("training step")
fig.colorbar(image, ax=ax_heat, label="rank kept")
steps = range(1, len(history["budget"]) + 1)
ax_budget.plot(steps, history["budget"], label="budget (total rank)")
ax_budget.plot(steps, [sum(r) for r in history["ranks"]], "--", label="ranks kept")
ax_budget.set_xlabel("training step")
ax_budget.legend(fontsize=8)
print("final ranks:", dict(zip(history["layers"], history["ranks"][-1], strict=True)))
fig

# %% [markdown]
# ## Speed: our LoRA and DoRA against peft's, and merged inference
#
# `benchmarks/lora_family_step_time.py` times an AdamW training step of ours and peft's on the same tiny
# model in the same run (interleaved rounds, median), and one forward pass of the base model, unmerged and
# merged adapters. The numbers below are read from the file it writes, with the command that wrote it.

# %%
import csv

from survey_utils.zoo import DATA_DIR

with (DATA_DIR / "lora_family_step_time.csv").open() as handle:
    timings = list(csv.DictReader(handle))
print("command:", timings[0]["command"], "| machine:", timings[0]["machine"], "| torch", timings[0]["torch"])
for row in timings:
    ratio = (f"{float(row['ratio']):.3f}x {row['ratio_against']} (minima: {float(row['ratio_min']):.3f}x)"
             if row["ratio"] else "")
    print(f"{row['phase']:<11}{row['case']:<16}{float(row['median_ms']):>9.2f} ms  {ratio}")

# %% [markdown]
# ## Summary
#
# * LoRA trains $r(d_\text{in}+d_\text{out})$ parameters per adapted layer; on Llama-2-7B with $r=8$ on
#   `q_proj` and `v_proj` that is 4,194,304 parameters, 0.062% of the model — the same number three ways.
# * Its outputs equal peft's bit for bit in float64, and merging leaves them unchanged: no inference cost.
# * Parameter-efficient is not memory-efficient by itself: activations and frozen weights still dominate
#   (chapter 00's memory model).
# * The family trades the same few ingredients: rsLoRA only rescales; DoRA adds one magnitude per output
#   and pays with a full-size norm every step and two more saved activations per layer; AdaLoRA moves rank
#   between layers but is counted (and stored) at its initial rank; VeRA trains a few hundred thousand
#   parameters for a 7B model but saves more activations than LoRA; LoHa and LoKr reach higher rank per
#   parameter and materialise the full update; KronA reaches full rank without ever forming it.
# * Every method here merges: after training, inference runs at the base model's speed.
#
# The closing numbers, computed above: counts for Llama-2-7B at $r=8$ on `q_proj` and `v_proj`, and the
# step-time ratios of our LoRA and DoRA against peft's (from `data/lora_family_step_time.csv`).

# %%
for row in family_rows:
    peft_text = f"{row['peft']:,}" if row["peft"] is not None else "not in peft"
    print(f"{row['method']:<8} ours {row['formula']:>12,}   peft {peft_text:>12}")
for row in timings:
    if row["ratio"] and row["phase"] == "train_step":
        print(f"training step, {row['case']}: {float(row['ratio']):.3f}x peft's time "
              f"(minima: {float(row['ratio_min']):.3f}x)")
    elif row["ratio"] and "merged" in row["case"] and "unmerged" not in row["case"]:
        print(f"inference, {row['case']}: {float(row['ratio']):.3f}x the base model's time "
              f"(minima: {float(row['ratio_min']):.3f}x)")

# %% [markdown]
# ## Exercises
#
# 1. For which rank does LoRA on every linear layer of Llama-2-7B train 1% of the model? Use the explorer,
#    then check with `three_way`.
# 2. GPT-2 fuses $q, k, v$ into one `c_attn` layer. How does that change the count against Llama's separate
#    projections at the same rank?
# 3. Why must $B$, not $A$, start at zero? What would happen with both at zero?
# 4. LoHa with $r=2$ and LoRA with $r=4$ train the same number of parameters. In the spectra above, which
#    learned update has more non-zero singular values, and why can LoHa never exceed $r^2$?
# 5. Change the teacher so that only block 0's `v_proj` is perturbed. Where does AdaLoRA put its rank now?
# 6. Why does DoRA's step cost more than LoRA's on a large model, though it trains only $d_\text{out}$ more
#    parameters per layer? (Look at `DoRALinear.weight_norm`.)
