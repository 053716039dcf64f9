# %% [markdown]
# # Chapter 05 — Hybrid methods: MAM adapter, UniPELT, Compacter++, scaled parallel adapter
#
# The methods of chapters 01–04 are not rivals: they sit in different places of a transformer block, so they
# can be combined. Xu et al. 2023 call the combinations *hybrid* (manual: MAM adapter, UniPELT; automatic:
# AutoPEFT, S4); Wang et al. 2024 list UniPELT, MAM and S4 as hybrid; in Lialin et al. 2023's Venn diagram a
# hybrid is an overlap (MAM = adapters ∩ soft prompts; UniPELT = adapters ∩ soft prompts ∩ reparametrization).
#
# ## The idea
#
# A hybrid applies several registered methods to one model. With a prefix $P_K, P_V$ in attention, a parallel
# adapter beside the FFN and LoRA on $W_Q, W_V$:
#
# $$\mathrm{attn} = \mathrm{softmax}\big(q\,[g_P P_K; K]^\top/\sqrt{d_h}\big)[g_P P_V; V], \qquad
#   h = W_0 x + g_L\,\tfrac{\alpha}{r} B A x, \qquad y = \mathrm{FFN}(x) + s\,g_A\,\Delta(x).$$
#
# * **MAM adapter** (He et al. 2022, arXiv:2110.04366): prefix tuning + a scaled parallel adapter ($s$ = 4),
#   no gates.
# * **UniPELT** (Mao et al. 2022, arXiv:2110.07577): prefix + sequential adapter + LoRA, each multiplied by a
#   learned gate $g(x) = \mathrm{mean}_t\,\sigma(W_g x_t + b_g)$, so training can switch a part off.
# * **Compacter++** (Mahabadi et al. 2021): Compacter's Kronecker-factored adapter after the FFN only.
# * **Scaled parallel adapter** (He et al. 2022): the parallel adapter with a learned scale $s$.
#
# **Count.** A composition trains the sum of its parts plus what it adds of its own (UniPELT's gates, $d + 1$
# each; one scalar per scaled adapter). **Defaults.** peft has none of these; the defaults are AdapterHub's
# (`adapters` 1.2.0, `src/adapters/configuration/adapter_config.py`: `MAMConfig`, `UniPELTConfig`,
# `CompacterPlusPlusConfig`, `ParBnConfig(scaling="learned")`).

# %%
# %matplotlib widget
import inspect

from IPython.display import Code, Markdown, display

from survey_utils.counting import closed_form, count
from survey_utils.experiments.ch05_hybrid import search
from survey_utils.methods import get_method, hybrid
from survey_utils.methods.hybrid import unipelt_gate_params
from survey_utils.widgets.design_search import DesignSearchExplorer
from survey_utils.zoo import load_config

HYBRIDS = ["mam_adapter", "unipelt", "compacter_pp", "scaled_parallel"]

# %% [markdown]
# ## Where they sit in the three surveys

# %%
rows = [f"| {get_method(m).title} | {get_method(m).taxonomy.xu} | {get_method(m).taxonomy.wang} | "
        f"{get_method(m).taxonomy.lialin} |" for m in HYBRIDS]
display(Markdown("| method | Xu et al. 2023 | Wang et al. 2024 | Lialin et al. 2023 |\n|---|---|---|---|\n"
                 + "\n".join(rows)))

# %% [markdown]
# ## Composition, not copies
#
# Each hybrid is a few lines: its parts (registered methods with the recipe's settings) and, for UniPELT,
# an `Extra` with the gates. Every hyper-parameter of a part is exposed as `<part>.<name>`.

# %%
display(Code(inspect.getsource(hybrid).split(
    "# --------------------------------------------------------------------------------------- the recipes")[1],
    language="python"))
print({k: v for k, v in get_method("unipelt").defaults().items() if not k.endswith("target_modules")})

# %% [markdown]
# ## Check 1 — the composition is its parts plus its extras
#
# The closed form, the model built on `meta` with every part applied, and the parts' own closed forms:

# %%
for model in ["roberta-base", "t5-large"]:
    for name in HYBRIDS:
        method = get_method(name)
        formula = closed_form(model, method).trainable
        built = count(model, method, implementation="scratch").trainable
        parts = sum(p.registered.count(load_config(model), **dict(p.settings)) for p in method.parts)
        print(f"{model:<13} {name:<16} formula {formula:>12,}  built {built:>12,}  parts {parts:>12,}  "
              f"own extras {formula - parts:>7,}  {'match' if formula == built else 'MISMATCH'}")
        assert formula == built

# %% [markdown]
# UniPELT's extras are its gates: one $(d+1)$-parameter gate per LoRA target, per adapter and per prefixed
# attention:

# %%
display(Code(inspect.getsource(unipelt_gate_params), language="python"))

# %% [markdown]
# **Where our counts differ from AdapterHub's.** Our prefix tuning (chapter 02) prefixes T5's decoder
# self-attention only; AdapterHub also prefixes T5's encoder and cross-attention, each with its own MLP, so on
# T5 AdapterHub's MAM and UniPELT train more than the numbers here. Our gated LoRA keeps its $\alpha/r$ factor
# (AdapterHub drops it when a gate is on): the count is the same, the initial scale of LoRA's branch is not.
#
# ## Check 2 — identity at init, and the gates learn
#
# Zero-initialised parts (LoRA's $B$, the adapters' up-projection) keep the hybrid equal to the base model at
# initialisation; the prefix changes the output by design. `tests/methods/test_hybrid.py` checks both on four
# tiny architectures with real tensors, checks that every gate and learned scale moves in three AdamW steps,
# and compares the memory estimate with a fake-tensor simulation (within 5% on tiny-bert and tiny-llama).
#
# ## A budgeted design search
#
# AutoPEFT and S4 *search* the combination. Here the design space is LoRA on $W_Q, W_V$ ($r$ from 0 to 128),
# prefix tuning ($n$ from 0 to 200), a serial or parallel adapter ($k$ from 8 to 512), on all blocks or the
# upper half: 2,151 candidates. Each is scored from the closed forms only (trainable parameters, the memory
# model's peak for one training step, extra inference FLOPs after LoRA is merged); the front keeps the
# candidates that give the most trainable capacity for their memory and inference cost. Move the budgets; the
# red stars are the named configurations at their defaults (shown when they fit), the ring is the chosen front
# point, broken down by part on the right.

# %%
explorer = DesignSearchExplorer(["roberta-base", "t5-large", "llama-2-7b", "tiny-llama"], model="roberta-base")
explorer

# %% [markdown]
# The sliders are plain values; setting one from code runs the same callback. A budget below every candidate
# is one line in the message area, and the plot keeps its last front:

# %%
before = len(explorer.view.result.feasible)
explorer.controls["memory"].value = 1.1
print(f"memory budget x1.3 -> x1.1: {before} -> {len(explorer.view.result.feasible)} feasible candidates")
explorer.controls["trainable"].value = 0.001
print("message:", explorer.error)
explorer.controls["trainable"].value = 1.0
explorer.controls["memory"].value = 1.3

# %% [markdown]
# ## What the surveys report
#
# Lialin et al. v1 (text, via transcription): MAM changes about 0.1% of parameters through its soft prompts and
# beats LoRA, adapters and prefix tuning "at 7% extra parameters"; UniPELT trains 1.3% on BERT; Compacter++
# matches adapters at 0.05%. Beside them, ours on roberta-base (125M) at the AdapterHub defaults:

# %%
total = closed_form("roberta-base", "lora").total
for name in HYBRIDS:
    n = get_method(name).count(load_config("roberta-base"))
    print(f"{name:<16} {n:>12,}  = {100 * n / total:.3f}% of roberta-base")

# %% [markdown]
# ## Summary
#
# * A hybrid is a composition of registered parts; its count is the parts' plus its own extras, the same three
#   ways on every model of the zoo.
# * The closing numbers: trainable parameters at the defaults, and the search's speed
#   (`python benchmarks/design_search_speed.py` prints about 35,000–43,000 candidates per second once each
#   part's closed forms are cached, on a shared 2-core machine).

# %%
for model in ["roberta-base", "t5-large"]:
    config = load_config(model)
    print(model, {name: f"{get_method(name).count(config):,}" for name in HYBRIDS})
result = search("roberta-base", 10**12, 2**62)
print(f"design search: {result.evaluated} candidates in {result.seconds * 1e3:.0f} ms (first search, atoms "
      f"included): {result.per_second:,.0f} candidates/s")

# %% [markdown]
# ## Exercises
#
# 1. Set UniPELT's `lora.r` to 16. By how much does the count grow, and how much of that is gates?
# 2. Why does the front never contain a candidate with LoRA on all blocks and nothing else when the memory
#    budget is tight? (Where do its gradients start?)
# 3. MAM's prefix is trained through an 800-wide MLP. How many parameters remain after folding the MLP
#    (chapter 02's `PrefixEncoder.fold`)?
