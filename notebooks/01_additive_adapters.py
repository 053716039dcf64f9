# %% [markdown]
# # Chapter 01 — Additive methods I: bottleneck adapters, (IA)³ and Ladder Side-Tuning
#
# Additive methods keep every pretrained weight frozen and *add* small trainable modules. The oldest and
# best known are bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751). HF peft has none of the
# classic adapters, so this chapter builds them from scratch, next to their cost in parameters, memory and
# inference time.
#
# ## The idea and the equations
#
# **Bottleneck adapter.** For a hidden state $h \in \mathbb{R}^d$, a down-projection to $k = d / r_f$
# dimensions ($r_f$ the *reduction factor*), a non-linearity $f$ and an up-projection, added back:
#
# $$\operatorname{Adapter}(h) = h + W_\text{up}\, f(W_\text{down} h + b_\text{down}) + b_\text{up},
#   \qquad W_\text{down} \in \mathbb{R}^{k \times d},\ W_\text{up} \in \mathbb{R}^{d \times k}.$$
#
# It trains $2dk + d + k$ parameters. With $W_\text{up} = 0$ and $b_\text{up} = 0$ at initialisation the
# adapter is the identity, so training starts from the pretrained model.
#
# * **Houlsby** (serial): one adapter after the attention output projection and one after the FFN, in every block.
# * **Pfeiffer** (Pfeiffer et al. 2021, arXiv:2005.00247): one adapter per block, after the FFN.
# * **Parallel** (He et al. 2022, arXiv:2110.04366): beside the FFN, reading the FFN's input $x$, scaled:
#   $\;y = \operatorname{FFN}(x) + s\,\big(W_\text{up} f(W_\text{down} x + b_\text{down}) + b_\text{up}\big)$.
# * **AdapterDrop** (Rücklé et al. 2021, arXiv:2010.11918): no adapters in the lowest $k$ blocks; the
#   backward pass then stops at block $k$, which makes training faster.
# * **Compacter** (Mahabadi et al. 2021, arXiv:2106.04647): each projection is a PHM layer
#   $W = \sum_{i=1}^{n} A_i \otimes (s_i t_i^\top)$, with $A_i \in \mathbb{R}^{n\times n}$ shared by every
#   adapter of the model and rank-$r$ factors $s_i, t_i$ per layer: $r(d_\text{in} + d_\text{out})$ per
#   layer plus $n^3$ once.
#
# **(IA)³** (Liu et al. 2022, arXiv:2205.05638) learns vectors that rescale keys, values and the FFN's inner
# activations: $k \leftarrow l_k \odot k$, $v \leftarrow l_v \odot v$, $\;\operatorname{FFN}(x) =
# W_\text{down}\,(l_\text{ff} \odot \sigma(W_\text{up} x))$; the vectors start at one.
#
# **Ladder Side-Tuning** (Sung et al. 2022, arXiv:2206.06522) trains a thin side network of width
# $w = d / r_f$, fed through a "ladder" of down-projections $D_i$ from every backbone layer and gated:
# $s_i = \operatorname{Side}_i\big(\mu_i s_{i-1} + (1 - \mu_i) D_i h_i\big)$, $\mu_i = \sigma(\alpha_i / T)$;
# its output is up-projected and added to the final hidden state. The backbone's states enter *detached*:
# there is no backward pass through the backbone.

# %%
# %matplotlib widget
import copy
import csv
import inspect

from IPython.display import Code, Markdown, display

from survey_utils.counting import apply_method, closed_form, format_rows, three_way
from survey_utils.memory.closed_form import estimate
from survey_utils.methods import adapters, get_method
from survey_utils.methods.layers import adapters as adapter_layers
from survey_utils.parity import example_inputs, forward, parity
from survey_utils.plotting import human
from survey_utils.widgets.budget import EqualBudgetExplorer
from survey_utils.widgets.memory import MemoryExplorer
from survey_utils.zoo import DATA_DIR, build_model, load_config

CHAPTER = ["houlsby", "pfeiffer", "parallel_adapter", "adapterdrop", "compacter", "ia3", "lst"]
methods = [get_method(name) for name in CHAPTER]

# %% [markdown]
# ## Where each method sits in the three surveys
#
# From the registry (values follow `data/catalogue.csv`; "not placed" where the survey's taxonomy does not
# name the method). Lialin et al. place methods in a Venn diagram: `A` additive, `S` selective,
# `R` reparametrization-based.

# %%
rows = "\n".join(f"| {m.title} | {m.paper.split(',')[0]} ({m.arxiv_id}) | {m.taxonomy.xu} | {m.taxonomy.wang} | "
                 f"{m.taxonomy.lialin} |" for m in methods)
display(Markdown("| method | paper | Xu et al. 2023 | Wang et al. 2024 | Lialin et al. 2023 |\n"
                 "|---|---|---|---|---|\n" + rows))

# %% [markdown]
# ## From scratch
#
# The bottleneck, and the wrapper that puts it after (serial) or beside (parallel) a frozen module. The
# wrapper keeps the frozen module as `base_layer`, so counting still finds the base model's parameters.

# %%
display(Code(inspect.getsource(adapter_layers.Bottleneck), language="python"))
display(Code(inspect.getsource(adapter_layers.AdapterWrapper.forward), language="python"))

# %% [markdown]
# Where adapters go is read from the model's layout, not hard-coded per architecture: in each block the
# attention output is the last linear module of the first attention group, the FFN output the last MLP
# linear module. T5 gets adapters in its encoder and its decoder blocks.

# %%
for model in ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "opt-350m", "bloom-560m"]:
    sites = adapters.block_sites(load_config(model))
    last = sites[-1]
    print(f"{model:<11} {len(sites):>2} blocks   attention out: {last.attention_out.name:<42} "
          f"FFN out: {last.ffn_out.name}")

# %% [markdown]
# Compacter's PHM layer (the shared rule $A$ is one tensor for the whole model), (IA)³'s layer and the
# side network of Ladder Side-Tuning:

# %%
display(Code(inspect.getsource(adapter_layers.PHMLinear.kron_weight), language="python"))
display(Code(inspect.getsource(adapter_layers.IA3Layer.forward), language="python"))
display(Code(inspect.getsource(adapter_layers.LadderSideNetwork.step), language="python"))

# %% [markdown]
# The closed forms, e.g. the bottleneck adapters' and LST's:

# %%
display(Code(inspect.getsource(adapters.bottleneck_params), language="python"))
display(Code(inspect.getsource(adapters.lst_params), language="python"))

# %% [markdown]
# ## Check 1 — formula, built model and (for (IA)³) peft agree
#
# The closed form is arithmetic on the config; "built" counts our model built on the `meta` device; peft
# has only (IA)³ among this chapter's methods.

# %%
closing = [three_way(model, name) for model in ("roberta-base", "llama-2-7b") for name in CHAPTER]
others = [three_way(model, "ia3") for model in ("gpt2", "t5-base", "bloom-560m")]
print(format_rows(closing + others))
assert all(row["match"] for row in closing + others)

# %% [markdown]
# ## Check 2 — (IA)³ gives peft's outputs; every method is the identity at initialisation
#
# (IA)³ with the same (random) vectors as peft's, in float64, merged and unmerged, on GPT-2 (whose fused
# `c_attn` is a transposed `Conv1D`; `tests/methods/test_adapters.py` checks all four tiny architectures):

# %%
for model in ["tiny-gpt2"]:
    report = parity(model, "ia3", atol=1e-10)
    print(f"{model:<11} max |ours - peft| = {report.max_diff_vs_peft:.1e}   "
          f"max |merged - unmerged| = {report.max_diff_merged:.1e}   {'match' if report.ok else 'MISMATCH'}")
    assert report.ok

# %% [markdown]
# At initialisation the adapted model's output equals the base model's (up-projections at zero, (IA)³
# vectors at one). The tiny models have 4 blocks, so AdapterDrop drops 2 here.

# %%
print(f"{'':<11}" + "".join(f"{name:>18}" for name in CHAPTER))
for model in ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"]:
    base = build_model(model)
    inputs = example_inputs(base.config, batch=1, seq_len=8)
    reference = forward(base, inputs)
    diffs = []
    for name in CHAPTER:
        adapted = apply_method(copy.deepcopy(base), name, **({"drop_layers": 2} if name == "adapterdrop" else {}))
        diffs.append((forward(adapted, inputs) - reference).abs().max().item())
    print(f"{model:<11}" + "".join(f"{d:>18.1e}" for d in diffs))
    assert max(diffs) == 0.0

# %% [markdown]
# ## Explore: model, method, bottleneck, layers, placement
#
# The explorer's controls come from each method's hyper-parameters: `bottleneck_size` (0 takes
# `hidden // reduction_factor`), the reduction factor, the non-linearity, the block range, and the placement
# (Houlsby, Pfeiffer and parallel are separate methods; AdapterDrop and Compacter have a `placement`
# control). Top left: trainable parameters as `bottleneck_size` sweeps its range (the dot sits where the
# derived bottleneck lands while it is 0; LST, which has none, sweeps its reduction factor); top right: every method of
# the chapter on the same model. Below: the same budget spent on LoRA (its rank chosen so that its count is
# closest to the method's) and the memory of one training step for both (chapter 00's memory model; batch
# 8 x 512 tokens, bf16, AdamW).

# %%
explorer = EqualBudgetExplorer([*CHAPTER, "lora"], model="roberta-base", reference="lora", sweep="bottleneck_size",
                               title="Additive methods: trainable parameters")
explorer

# %% [markdown]
# The explorer is driven by plain values, so a change of setting is one assignment (the plots redraw). A
# second one, not displayed, so that the one above stays on roberta-base as the text says:

# %%
llama = EqualBudgetExplorer([*CHAPTER, "lora"], model="roberta-base", reference="lora", sweep="bottleneck_size")
llama.model_control.value = "llama-2-7b"
llama.method_control.value = "lst"
print(f"{llama.view.method} on {llama.view.model}: {llama.view.trainable:,} trainable ({llama.view.percent:.3f}%)")

# %% [markdown]
# ## Memory: what adapters add, and what LST saves
#
# Each method tells the memory model which tensors its own modules keep for the backward pass
# (`Method.memory_terms`): adapters keep their inputs and bottleneck activations, (IA)³ the tensors it
# rescales, LST the backbone states its ladder reads and its side network's activations — but, with no
# backward pass through the backbone, none of the backbone's own activations.

# %%
config = load_config("llama-2-7b")
print(f"{'method':<18}{'trainable':>12}{'peak':>11}{'activations':>13}   method's own terms")
for name in ["lora", *CHAPTER]:
    mem = estimate(config, name, {}, batch_size=8, seq_len=512)
    own = {k.removeprefix("method: "): f"{v / 2**30:.2f} GiB" for k, v in mem.activations_by_term.items()
           if k.startswith("method:")}
    print(f"{name:<18}{human(mem.trainable_params):>12}{mem.total / 2**30:>9.1f}GiB{mem.activations / 2**30:>10.1f}GiB   {own}")

# %% [markdown]
# Chapter 00's memory view, with this chapter's methods (default settings): the estimate's terms at the
# peak, and (tick "simulate") a step run on fake tensors beside it; right, the peak against sequence length.

# %%
memory_view = MemoryExplorer(methods=[*CHAPTER, "lora"], model="llama-2-7b", method="lst")
display(memory_view.widget)

# %% [markdown]
# ## Inference: adapters cannot be merged
#
# LoRA and (IA)³ fold into the base weights after training; bottleneck adapters, Compacter and LST stay
# as extra modules. `benchmarks/adapter_inference_overhead.py` measures the extra forward FLOPs (matrix
# products, counted by `torch.utils.flop_counter`) and the latency on a tiny model, and AdapterDrop's
# training step. Its last run (the command and the machine are in the file):

# %%
with (DATA_DIR / "adapter_inference_overhead.csv").open(encoding="utf-8") as handle:
    bench = list(csv.DictReader(handle))
print(f"{bench[0]['model']}, batch {bench[0]['batch']} x {bench[0]['seq_len']}; {bench[0]['machine']}")
print(f"{'method':<18}{'trainable':>10}{'extra FLOPs':>13}{'latency':>10}{'overhead':>10}{'train step vs full':>20}")
for row in bench:
    train = f"{float(row['train_step_vs_full_pct']):+.1f}%" if row["train_step_vs_full_pct"] else ""
    print(f"{row['method']:<18}{int(row['trainable']):>10,}{float(row['extra_flops_pct']):>+12.2f}%"
          f"{float(row['latency_ms']):>8.1f}ms{float(row['latency_overhead_pct']):>+9.1f}%{train:>20}")

# %% [markdown]
# On this shared CPU the latencies move by several percent from run to run; the FLOPs are exact. The
# extra FLOPs of an adapter are $2 \cdot 2dk$ per token per adapter, small against the block's
# $\approx 24d^2$, but each adapter is a separate sequence of small kernels that cannot overlap with the
# block's large ones, which is why the papers measure a latency overhead larger than the FLOP count.

# %% [markdown]
# ## What the surveys report
#
# Trainable fractions reported in the papers, as transcribed (with their sources) in `data/catalogue.csv`,
# next to this chapter's closed form with its default settings on roberta-base:

# %%
with (DATA_DIR / "catalogue.csv").open(encoding="utf-8") as handle:
    catalogue = {row["key"]: row for row in csv.DictReader(handle)}
for name in CHAPTER:
    row = catalogue.get(name, {})
    ours = closed_form("roberta-base", name)
    reported = f"{row['pct_trainable_reported']}%" if row.get("pct_trainable_reported") else "not reported"
    print(f"{name:<18} reported {reported:>13}   ours on roberta-base {ours.trainable_percent:.3f}%"
          + (f"   source: {row['pct_trainable_source']}" if row.get("pct_trainable_source") else ""))

# %% [markdown]
# ## Summary
#
# The counts below are computed in this notebook (defaults of each method; AdapterHub's defaults for the
# adapters: reduction factor 16 for Houlsby and Pfeiffer, 2 with scale 4 for the parallel adapter, 32 for
# Compacter; AdapterDrop drops the lowest 5 blocks; LST's reduction factor is 8).

# %%
print(format_rows(closing))

# %% [markdown]
# * A bottleneck adapter trains $2dk + d + k$ parameters; placement decides how many there are (Houlsby two
#   per block, Pfeiffer and parallel one). Compacter shrinks each adapter to $2r(d + k) + d + k$ plus $n^3$
#   shared parameters; (IA)³ trains only vectors.
# * All of them start as the identity: the adapted model's outputs equal the base model's, checked above.
# * Adapters add activations and cannot be merged; LST trades parameters for memory by never
#   back-propagating through the backbone.
#
# ## Exercises
#
# 1. With the explorer, find the bottleneck size at which Houlsby adapters on Llama-2-7B train as many
#    parameters as LoRA with $r = 8$ on `q_proj` and `v_proj`. Why is it close to $r$?
# 2. How many blocks must AdapterDrop drop on roberta-base to halve Pfeiffer's trainable parameters? What
#    does the benchmark say about the training step?
# 3. For which sequence length does LST's memory peak on Llama-2-7B fall below LoRA's by half? Which of its
#    terms grows with the number of layers?
