# %% [markdown]
# # Chapter 06 — Quantized and memory-efficient PEFT: NF4, int8, QLoRA, LoftQ
#
# Parameter-efficient is not memory-efficient (chapter 00): LoRA trains 0.3% of Llama-2-7B's parameters but
# still holds all of its frozen weights in 16 bits. Quantized PEFT stores the frozen base in 4 or 8 bits and
# trains the adapters in 16. Wang et al. 2024 make it a family of its own (QLoRA, QA-LoRA, LoftQ, ...); Xu et
# al. 2023 list QLoRA among LoRA's derivatives for "quantization adaption".
#
# ## The idea
#
# A frozen weight $W_0$ is stored as $q(W_0)$ and dequantized on the fly, one layer at a time, in the
# compute dtype:
#
# $$h = \mathrm{dequant}\bigl(q(W_0)\bigr)\,x + \frac{\alpha}{r}\,B A x .$$
#
# Gradients flow through $\mathrm{dequant}(q(W_0))$ to the input; $W_0$ itself gets none. The storage
# drops from 2 bytes per weight (bf16) to about 0.52 (NF4 with double quantization).

# %%
# %matplotlib widget
from survey_utils.advisor import advise, format_advice
from survey_utils.counting import format_rows, three_way
from survey_utils.experiments import ch06_quantized as ch06
from survey_utils.memory.reserved_figure import reserved_validation_figure
from survey_utils.methods import get_method
from survey_utils.parity import parity
from survey_utils.quantization import nf4_codebook
from survey_utils.widgets.advisor import FeasibilityExplorer, FeasibilityTable
from survey_utils.widgets.quantization import QLoRAMemoryExplorer, QuantizationExplorer
from survey_utils.zoo import load_config

qlora = get_method("qlora")

# %% [markdown]
# ## NF4 from scratch
#
# QLoRA's NormalFloat (Dettmers et al. 2023, arXiv:2305.14314, section 3) puts its 16 values at quantiles of
# $\mathcal N(0,1)$, because pretrained weights are roughly normal: each value then covers the same share of
# the weights. With $\delta = \frac12(\frac1{30} + \frac1{32})$,
#
# $$q_i = \Phi^{-1}\!\bigl(\mathrm{linspace}(1-\delta, \tfrac12, 9)_i\bigr)\ (i<8), \qquad
#   -\Phi^{-1}\!\bigl(\mathrm{linspace}(1-\delta, \tfrac12, 8)_i\bigr)\ (i<7), \qquad 0,$$
#
# divided by the largest: 8 positive values, 7 negative and an exact zero. A weight is cut into blocks of 64,
# each divided by its absolute maximum; each value becomes the index of its nearest $q_i$. *Double
# quantization* stores the block maxima in 8 bits too (256 per block), saving $\frac{4}{64} - \frac{1}{64} -
# \frac{4}{64 \cdot 256} \approx 0.047$ bytes per weight. Our codebook, codes and dequantized tensors against
# `bitsandbytes.functional.quantize_4bit` on CPU, for a weight of Qwen2.5-0.5B's query projection's shape
# (896 x 896; the tests add its MLP's 896 x 4864):

# %%
print("NF4 codebook:", [round(v, 4) for v in nf4_codebook().tolist()])
weight = ch06.real_shaped_weight(896, 896)
for double_quant in (False, True):
    print(f"double quantization {double_quant}:", ch06.nf4_vs_bitsandbytes(weight, double_quant))

# %% [markdown]
# Without double quantization everything is equal, bit for bit. With it, the 4-bit codes, the offset and
# the second-level constants are equal, but bitsandbytes' CPU kernel rounds about 0.2% of the 8-bit absmax
# codes to the farther of two neighbours (ours takes the nearest), so a few blocks differ by one absmax step
# (`tests/test_quantization.py` pins both facts, and a third: on CPUs with AVX512 its dequantization kernel
# errs when blocks cross rows, e.g. rows of 96; without AVX512 it is exact).
#
# ## int8, and LLM.int8's outliers
#
# Absmax int8 stores $\mathrm{round}(127\,w / \max|w|)$ with one maximum per tensor or per row. LLM.int8
# (Dettmers et al. 2022, arXiv:2208.07339) multiplies the input features holding a magnitude of at least 6.0
# in 16 bits and the rest in int8, since a few outlier features would otherwise set every row's scale.
# The reconstruction errors of each storage, against fp32 (relative Frobenius error):

# %%
errors = ch06.reconstruction_table(weight)
for row in errors:
    print(f"{row['storage']:<30} relative {row['relative']:.4f}   max {row['max_abs']:.5f}   "
          f"{row['bytes/weight']:.4f} B/weight")
int8_matmul = ch06.llm_int8_errors(weight)
print("x @ W.T with 2 outlier features:", int8_matmul)

# %% [markdown]
# The explorer quantizes a real-shaped weight with the settings you choose: the histogram of the
# reconstruction shows the few values each block can take; the bars give its error and its bytes per
# weight. Its block sizes are those bitsandbytes' kernels accept that divide every weight it offers (a block
# size that does not divide the tensor cannot be quantized blockwise).

# %%
QuantizationExplorer()

# %% [markdown]
# ## QLoRA
#
# QLoRA is LoRA (chapter 04) on an NF4 base, on *every* linear layer of the blocks (the paper's finding:
# adapting all of them is what recovers 16-bit quality), computing in bf16. Our `QLoRALinear` is LoRA's
# layer unchanged around an `NF4Linear`. Counted three ways (peft: `LoraConfig` on the same targets):

# %%
print(format_rows([three_way("tiny-llama", qlora)]))
print(parity("tiny-llama", qlora))

# %% [markdown]
# **Packed and unpacked.** With bitsandbytes, a 4-bit weight is a `Params4bit` of $d_\text{out} d_\text{in}/2$
# uint8 elements (two codes per byte). peft's `get_nb_trainable_parameters` multiplies it by 2 and reports
# the weights' count, as we do (our `NF4Linear` keeps one code per uint8 element, and `packed()` gives
# bitsandbytes' bytes); summing `numel()` over the bitsandbytes model gives the packed count instead.
# Here on a real tiny model, with peft on bitsandbytes' `Linear4bit` layers:

# %%
counts = ch06.peft_bitsandbytes_counts("tiny-llama")
for name, value in counts.items():
    print(f"{name:<36}{value:>12,}")

# %% [markdown]
# QLoRA trains: eight AdamW steps on one batch of tiny-llama (the loss falls; the 4-bit base is unchanged):

# %%
trained = ch06.train_tiny("qlora", steps=8)
print([round(loss, 3) for loss in trained["losses"]], "base unchanged:", trained["base unchanged"])

# %% [markdown]
# ## LoftQ
#
# QLoRA starts from $B = 0$, i.e. from $q(W)$, carrying the whole quantization error. LoftQ (Li et al. 2024,
# arXiv:2310.08659) alternates $Q_t = q(W - A_{t-1}B_{t-1}^\top)$ and $A_tB_t^\top = \mathrm{SVD}_r(W - Q_t)$,
# so that $Q + BA$ starts closer to $W$. The relative error $\lVert W - (Q + \frac{\alpha}{r}BA)\rVert_F /
# \lVert W \rVert_F$ for a 128 x 256 weight at $r = 8$, for 1 to 5 iterations (peft's `loftq_init` moves its
# tensors to CUDA unconditionally, so it does not run here):

# %%
loftq_rows = ch06.loftq_errors(ch06.real_shaped_weight(128, 256), r=8, lora_alpha=16, iterations=5)
for row in loftq_rows:
    print(f"T={row['iterations']}  QLoRA init {row['QLoRA init (B=0)']:.4f}   LoftQ {row['LoftQ']:.4f}   "
          f"reduction {100 * row['reduction']:.1f}%")

# %% [markdown]
# ## QA-LoRA and PEQA: the fine-tuned model stays quantized
#
# Merging QLoRA's $BA$ into an NF4 weight needs a re-quantization, which rounds. **QA-LoRA** (Xu et al. 2023,
# arXiv:2309.14717) quantizes the base with one scale $s$ and offset $\beta$ per row and group of $L$ input
# columns, and feeds LoRA the input averaged over each group, so $A$ is $r \times d_\text{in}/L$:
#
# $$h = \tilde W x + \tfrac{\alpha}{r} B A\,\mathrm{pool}_L(x), \qquad
#   \text{merge: } \beta \mathrel{+}= \tfrac{\alpha}{r} BA / L ,$$
#
# exactly, with the integer codes untouched. **PEQA** (Kim et al. 2023, arXiv:2305.14152) quantizes each
# output channel, $W \approx s \odot (\bar W - z)$, and trains only $s$: one parameter per output
# feature. Neither is in peft; the tests check that both train, and that after merging the codes are
# unchanged and the outputs equal. Closed-form counts on Llama-2-7B at the defaults:

# %%
for name in ("qlora", "loftq", "qa_lora", "peqa"):
    print(f"{name:<8}{get_method(name).count(load_config('llama-2-7b')):>14,} trainable")

# %% [markdown]
# ## QLoRA's memory, and the optimizer's
#
# * **8-bit AdamW** (bitsandbytes) stores both moments in uint8 with one fp32 absmax per 256 values, but
#   only for tensors of at least 4096 elements; smaller ones keep fp32 moments (8 bytes per parameter).
# * **Paged optimizers** put the states in CUDA unified memory: when a long sequence spikes the activations,
#   the driver pages states out to CPU RAM and back. They change no byte of the steady state; they turn an
#   out-of-memory error at the rare peak into a slower step.
# * **Gradient checkpointing** keeps each block's input only and recomputes the block in backward: about
#   one more forward pass of time for most of the activations' memory.
#
# bitsandbytes 0.50.2 decides *per tensor* (`Optimizer2State.init_state`): with $n$ elements a tensor keeps
#
# $$O(n) = \begin{cases} 8n & n < 4096 \ (\texttt{min\_8bit\_size}: \text{two fp32 moments})\\
#   2n + 2\cdot 4\,\lceil n/256 \rceil & \text{otherwise (two uint8 moments, an fp32 absmax per 256)}\end{cases}$$
#
# plus two shared 256-entry fp32 quantization maps once. The memory model sums this over the trainable tensors
# (their sizes read from a `meta` build of the method). Against the real `AdamW8bit`'s state tensors after one
# step on CPU, and against treating the trainable parameters as one tensor:

# %%
adam8 = ch06.adamw8bit_state_bytes("tiny-llama", "qlora")
for name, value in adam8.items():
    print(f"{name:<30}{value:>12,}")

# %% [markdown]
# Each of tiny-llama's 56 LoRA factors has fewer than 4096 elements, so every one keeps fp32 moments: 8 bytes
# per parameter, four times what "8-bit" suggests. On a 7B model a LoRA factor has $r \cdot 4096$ elements and
# is quantized at $r \ge 1$; the threshold matters for small models, biases, norms and soft prompts.
#
# The fake-tensor simulation of chapter 00 holds an NF4 or int8 base as bitsandbytes 0.50.2 does
# (`survey_utils.memory.quantized_storage`): packed codes and block constants, and its kernels' tensors
# (a dequantized weight in the compute dtype alive during each matmul, in forward and again in backward).
# `python -m survey_utils memory --method qlora --quantization nf4 --simulate` puts it beside the estimate;
# the validation grid (`benchmarks/memory_grid.py`, `data/memory_validation.csv`) includes QLoRA on NF4.
#
# The explorer below stacks one step's memory terms for LoRA on every linear layer with the base in bf16,
# int8 or NF4 (LLaMA-65B is built from the transcribed architecture in `data/quantization_claims.csv`);
# the dashed line is the 48 GB GPU of QLoRA's claim.

# %%
QLoRAMemoryExplorer(["llama-65b", "llama-2-70b", "llama-2-13b", "llama-2-7b", "qwen2.5-0.5b", "tiny-llama"])

# %% [markdown]
# ## What the surveys report, recomputed
#
# Each claim beside our memory model (allocated bytes, no CUDA context; GB = $10^9$ B as the papers write),
# with the settings stated. Claims, architectures and settings come from `data/quantization_claims.csv`,
# each with its source.

# %%
claims = ch06.claims_table()
print(ch06.format_claims(claims))

# %% [markdown]
# * **QLoRA's 65B on 48 GB** holds: our estimate is below 48 GB at batch 1 x 512 with checkpointing.
# * **"780 GB"** for 16-bit full fine-tuning: our fp16 + fp32-master + fp32-Adam accounting gives 16 bytes
#   per parameter, about 1.05 TB; 780 GB is 11.9 bytes per parameter (about 16-bit weights and gradients
#   plus two fp32 moments, no master copy).
# * **GPT-3 175B, 1.2 TB**: our 16 bytes per parameter give 2.8 TB, 2.3x the claim; 1.2 TB is under 7 bytes
#   per parameter, less than 16-bit weights, gradients and two 16-bit moments (8 B): the figure likely
#   reflects a sharded or otherwise different setup that the paper does not spell out.
# * **350 GB with LoRA** agrees within 10%: the 16-bit weights (350 GB) dominate.
# * **Lialin's 12-20x**: read as multiples of the weights' bytes, our full fine-tuning with AdamW costs 4x
#   (fp32) to 8x (fp16 mixed precision) at batch 1; read as bytes per parameter it is 16.2, inside 12-20.
#
# ## Reserved, not allocated
#
# Everything above is *allocated* memory: the bytes of live tensors at the step's peak. What `nvidia-smi`
# and most published tables show is *reserved* memory (plus the CUDA context, a few hundred MiB per GPU):
# PyTorch's caching allocator (`c10/cuda/CUDACachingAllocator.cpp`) rounds every request up to 512 B, serves
# requests up to 1 MiB from 2 MiB segments and larger ones from 20 MiB segments (1-10 MiB) or their size
# rounded to 2 MiB, reuses the best-fitting free block, and never returns a segment on its own. So reserved
# $\ge$ allocated, and the gap grows when transient tensors of many sizes come and go (fragmentation).
#
# We do not guess that gap: the fake-tensor simulation records every allocation and free of the step in
# order, and `survey_utils.memory.allocator` replays them through a model of the caching allocator. The
# closed form's reserved term is derived from those replays (stated among its assumptions). One step of LoRA
# on tiny-llama, batch 1 x 128 (the replay's segments are large against so small a model):

# %%
for name, value in ch06.reserved_demo("tiny-llama", "lora", seq_len=128).items():
    print(f"{name:<40}{value / 2**20:>10.2f} MiB")

# %% [markdown]
# On the replay grid (`benchmarks/reserved_validation.py`, 40 simulated steps from 2M to 7B parameters) and
# against published peaks whose settings are transcribed in `data/published_peaks.csv` (with sources; the
# figures validate, they calibrate nothing), drawn from the committed CSVs:

# %%
reserved_fig, reserved_lines = reserved_validation_figure()
print("\n".join(reserved_lines))

# %% [markdown]
# ## More than one GPU
#
# Past one GPU, the ZeRO paper's accounting (Rajbhandari et al. 2020, arXiv:1910.02054) divides what each GPU
# holds: DDP replicates everything; ZeRO-1 shards the optimizer states over the $N$ GPUs, ZeRO-2 the gradients
# too, ZeRO-3 (FSDP full shard) the weights as well, at the price of gathering each wrapped unit (a block) in
# full while it runs: FSDP's peak holds the largest unit materialised. CPU offload moves the optimizer states
# (and with ZeRO-3 the weights) to host memory. Full fine-tuning of Llama-3-70B on 8 GPUs, bf16 AdamW,
# checkpointing, batch 1 x 2048, per GPU (fits: reserved + CUDA context within 80 GB):

# %%
print(ch06.format_sharding(ch06.sharding_table("llama-3-70b", "full", gpus=8), capacity=80 * 10**9))

# %% [markdown]
# ## What fits my GPUs
#
# `python -m survey_utils advise` asks the same question of every registered method at its defaults: does it
# fit, at what largest batch (at the sequence length) and largest sequence (at batch 1), and with the cheapest
# sharding that fits. QLoRA's claim, LLaMA-65B on one 48 GB GPU:

# %%
advice_65b = advise("llama-65b", "48GB")
print(format_advice(advice_65b))

# %% [markdown]
# Only the NF4 methods (QLoRA, LoftQ) fit: every 16-bit method needs the 131 GB of bf16 weights, and the
# int8 bases of QA-LoRA and PEQA still take 65 GB. On 8 x 80 GB, Llama-3-70B fits almost every method, most
# only with ZeRO-3 (the bf16 weights alone are 141 GB); full fine-tuning needs the optimizer states offloaded:

# %%
advice_70b = advise("llama-3-70b", "80GB", gpus=8)
print(format_advice(advice_70b))

# %% [markdown]
# The feasibility map asks it of several models at once: pick a GPU type and a count; each cell is one model
# and method (green: fits; olive: fits with gradient checkpointing; orange: fits only sharded; red: does not
# fit; grey: the method cannot run on that model). Pick a cell for its per-GPU terms.

# %%
FeasibilityExplorer(FeasibilityTable(models=("llama-2-7b", "llama-2-13b", "mistral-7b", "llama-65b",
                                             "llama-3-70b")), gpu="rtx-a6000")

# %% [markdown]
# ## Summary
#
# The closing numbers, computed above: NF4's and int8's reconstruction errors, LoftQ's error reduction, the
# 8-bit optimizer's state bytes against our estimate, the claims, the reserved-memory validation, and the
# advisor's answers.

# %%
for row in errors:
    print(f"{row['storage']:<30} relative error {row['relative']:.4f}")
print(f"LoftQ, 5 iterations: {100 * loftq_rows[-1]['reduction']:.1f}% less initial error than QLoRA's B = 0")
print(f"AdamW8bit states: bitsandbytes {adam8['bitsandbytes state bytes']:,} B, memory model "
      f"{adam8['memory model estimate']:,} B")
for row in claims:
    print(f"{row['claim'][:60]:<61} claimed {row['claimed']:g} {row['unit']}, ours {row['ours']:g}")
print("\n".join(reserved_lines))
for advice in (advice_65b, advice_70b):
    answer = {r.method: r.sharding or "does not fit" for r in advice.rows}
    print(f"{advice.model} on {advice.gpus} x {advice.gpu_memory / 1e9:g} GB: {sum(r.fits for r in advice.rows)} of "
          f"{len(advice.rows)} methods fit; full fine-tuning: {answer['full']}; QLoRA: {answer['qlora']}")

# %% [markdown]
# ## Exercises
#
# 1. Set the explorer's block size to 256: by how much do the error and the bytes per weight change? Which
#    would you rather spend 0.05 B per weight on?
# 2. Why does NF4 use 8 positive and 7 negative values rather than a symmetric 16?
# 3. Which rank on every linear layer of LLaMA-65B still fits 48 GB at batch 1 x 512 (use the memory
#    explorer)? What about without gradient checkpointing?
# 4. Why does merging a QLoRA adapter into its NF4 base change the model's outputs, while merging LoRA does
#    not? (Look at `QLoRALinear.merge`.)
