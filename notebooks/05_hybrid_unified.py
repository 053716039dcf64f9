# %% [markdown]
# # Chapter 05 — Hybrid and unified methods: MAM, UniPELT, S4, Compacter++, scaled parallel, ProPETL, AdaMix, SparseAdapter
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
# * **S4** (Chen et al. 2023, arXiv:2301.01821): the blocks in four *spindle* groups (1:2:2:1), each group with its
#   own strategies (G1: adapter + LoRA; G2: adapter + prefix; G3: adapter + prefix + BitFit; G4: prefix + BitFit +
#   LoRA).
#
# Xu et al. also name *unified* methods: one adapter design that carries a second idea inside it (ProPETL, AdaMix,
# SparseAdapter, section "Unified methods" below).
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
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch05_hybrid import search, unified_checks
from survey_utils.methods import get_method, hybrid
from survey_utils.methods.hybrid import unipelt_gate_params
from survey_utils.widgets.design_search import DesignSearchExplorer
from survey_utils.zoo import load_config

HYBRIDS = ["mam_adapter", "unipelt", "compacter_pp", "scaled_parallel", "s4"]
UNIFIED = ["propetl", "adamix", "sparse_adapter"]

# %% [markdown]
# ## Where they sit in the three surveys

# %%
rows = [f"| {get_method(m).title} | {get_method(m).taxonomy.xu} | {get_method(m).taxonomy.wang} | "
        f"{get_method(m).taxonomy.lialin} |" for m in HYBRIDS + UNIFIED]
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
# The closed form, the model built on `meta` with every part applied, and the parts' own closed forms at the
# settings the hybrid gives them on that model (`Method.part_hyperparams`: S4's groups become its parts' layers):

# %%
for model in ["roberta-base", "t5-large"]:
    config = load_config(model)
    for name in HYBRIDS:
        method = get_method(name)
        try:
            by_part = method.part_hyperparams(config, **method.resolve(config))
        except SurveyError as error:  # S4 on T5: its BitFit groups find no bias
            print(f"{model:<13} {name:<16} refused: {error}")
            continue
        formula = closed_form(model, method).trainable
        built = count(model, method, implementation="scratch").trainable
        parts = sum(p.registered.trainable_params(config, **by_part[p.label]) for p in method.parts)
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
# ## Unified methods: ProPETL, AdaMix, SparseAdapter
#
# Each is one adapter design with a second idea inside it, at the bottleneck adapters' sites ($d$ the width, $k$ the
# bottleneck, $L$ adapted layers):
#
# * **ProPETL** (Zeng et al. 2023, arXiv:2305.17682): one *prototype* adapter for the whole model; layer $l$ uses
#   it through its own binary masks, $\Delta_l(x) = (W_\uparrow \odot M^\uparrow_l)\, f\big((W_\downarrow \odot
#   M^\downarrow_l) x + b_\downarrow\big) + b_\uparrow$, with $M_l$ = 0 on the $\lfloor s\,n \rfloor$ smallest of
#   real scores $|S_l|$ that train through a straight-through estimator. Training trains
#   $(2dk + d + k) + L \cdot 2dk$ values; a trained model *stores* the prototype once plus $2dk$ **bits** per layer.
#   Defaults from ProPETL's RoBERTa script: Pfeiffer placement, reduction factor 12, $s = 0.5$.
# * **AdaMix** (Wang et al. 2022, arXiv:2205.12410): $E$ adapters per site; each training step routes through one
#   down- and one up-projection drawn at random; inference serves the average
#   $\bar W = \frac1E\sum_e W^{(e)}$: one adapter's cost. Count $\sum_\text{sites} [E_\downarrow (dk + k) +
#   E_\uparrow (kd + d)]$; defaults from microsoft/AdaMix's README: $k = 16$, $E = 4$, the up-projection shared.
# * **SparseAdapter** (He et al. 2022, arXiv:2210.04284): an adapter pruned at initialisation; only the kept
#   entries train, $\sum [2(dk - \lfloor s\,dk \rfloor) + d + k]$. "Large-Sparse" widens the adapter and prunes
#   it to the same count. Default $s = 0.4$ (Lialin et al.: about 40%), random pruning (the paper's `rand`
#   pruner; its SNIP choice keeps as many entries, chosen from a batch of data).
#
# **Check.** Neither peft nor AdapterHub implements these three, so the count is checked two ways, closed form
# against the built model (here on roberta-base; on every model of the zoo in `tests/methods/test_hybrid_unified.py`):

# %%
for model in ["roberta-base"]:
    for name in UNIFIED:
        formula = closed_form(model, name).trainable
        built = count(model, name, implementation="scratch").trainable
        print(f"{model:<13} {name:<15} formula {formula:>11,}  built {built:>11,}  "
              f"{'match' if formula == built else 'MISMATCH'}")
        assert formula == built

# %% [markdown]
# **Measured with real tensors** (tiny-bert): ProPETL's layers read one prototype storage, and what a trained model
# stores is the prototype plus one bit per mask entry; AdaMix's served adapter is the adapter of the experts'
# mean weights; SparseAdapter's pruned entries are not parameters at all, so AdamW's moments hold exactly the
# closed-form count (chapter 03's gradient masks keep dense tensors and dense states), and every kept tensor trains.

# %%
for check in unified_checks("tiny-bert"):
    print(f"{check.method:<15} {check.claim:<75} measured {check.measured:>10,.6g}  expected "
          f"{check.expected:>10,.6g}  {'holds' if check.holds else 'FAILS'}")
    assert check.holds

# %% [markdown]
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
# matches adapters at 0.05%; S4 was searched on T5-base at 0.5%; AdaMix uses about 4–8 experts with random
# single-expert routing; SparseAdapter prunes about 40% of large adapters. Xu et al.'s experiments report ProPETL's
# adapter at about 1.5% of full fine-tuning's trainable parameters (read from a summary of the paper, table not
# read: `data/catalogue.csv`). Beside them, ours on roberta-base (125M) at our defaults (AdapterHub's for the
# hybrids, the papers' for the unified methods; ProPETL counts its scores, which train, not its stored bits):

# %%
total = closed_form("roberta-base", "lora").total
for name in HYBRIDS + UNIFIED:
    n = get_method(name).count(load_config("roberta-base"))
    print(f"{name:<16} {n:>12,}  = {100 * n / total:.3f}% of roberta-base")

# %% [markdown]
# ## Summary
#
# * A hybrid is a composition of registered parts; its count is the parts' plus its own extras, the same three
#   ways on every model of the zoo.
# * A unified method is one adapter with a second idea inside: shared storage with masks (ProPETL), a mixture
#   averaged into one adapter (AdaMix), pruning at initialisation (SparseAdapter). What trains, what is stored and
#   what is served can be three different numbers.
# * The same front from the command line: `python -m survey_utils search --model roberta-base
#   --trainable-budget 1% --memory-budget 4GiB --json`.
# * The closing numbers, computed below: trainable parameters at the defaults, and the search's speed (the first
#   search, which scores each part's closed forms once; `python benchmarks/design_search_speed.py` also times the
#   later searches, which reuse them, on three models).

# %%
def count_or_refusal(name: str, config: object) -> str:
    try:
        return f"{get_method(name).count(config):,}"
    except SurveyError as error:
        return f"refused ({error})"


for model in ["roberta-base", "t5-large"]:
    config = load_config(model)
    for name in HYBRIDS + UNIFIED:
        print(f"{model:<13} {name:<16} {count_or_refusal(name, config)}")
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
# 4. ProPETL on roberta-base: how many bytes does a trained model store (`propetl_stored_bytes`) against the bf16
#    bytes of a Pfeiffer adapter in every layer at the same reduction factor?
