r"""The tensors a training step saves for backward, block by block, family by family (chapter 00).

Autograd saves an operator's inputs or outputs only when one of its inputs requires a gradient. With a
frozen backbone that happens from the *lowest trainable module* on: blocks below it save nothing, and in
its own block only what comes after it is saved. Each family's recipe therefore lists one block's saved
tensors in forward order, each tagged with its *stage*; :func:`saved_activations` keeps the blocks at
and above the lowest trainable one and, in that block, the tensors after the trainable module's stage.

Every recipe was written from the tensors torch saves in transformers' code (listed with
``torch.autograd.graph.saved_tensors_hooks`` on the tiny models) and depends on the device:

- **CPU** (what the fake-tensor simulation runs): SDPA with attention dropout in train mode takes the
  *math* path, which upcasts q, k, v to fp32 and keeps three fp32 :math:`b\,h\,s^2` tensors (the softmax,
  the dropout noise, the dropped probabilities); without dropout its flash kernel keeps q, k, v, the output
  and the fp32 log-sum-exp. Dropout keeps its noise tensor in the activation dtype; LayerNorm keeps its
  mean and reciprocal standard deviation in the activation dtype.
- **CUDA**: SDPA's flash and memory-efficient kernels handle dropout themselves (no :math:`s^2` tensor),
  dropout keeps a 1-byte mask, LayerNorm keeps fp32 statistics.

Both: the model is in train mode (dropout active wherever the config sets a probability), GPT-2's
tanh-GELU is Python code that keeps four intermediate tensors, Llama's RMSNorm and T5's LayerNorm upcast to
fp32, causal LMs take the loss on fp32 logits while BERT's and T5's ``CrossEntropyLoss`` takes it in the
model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import (  # the stages are the layout's (ModuleSpec.stage); re-exported here
    ATTN_CORE,
    ATTN_IN,
    ATTN_NORM,
    ATTN_OUT,
    ATTN_POST,
    CROSS_CORE,
    CROSS_IN,
    CROSS_NORM,
    CROSS_OUT,
    CROSS_POST,
    INPUT,
    MLP_ACT,
    MLP_IN,
    MLP_NORM,
    MLP_OUT,
    MLP_POST,
    Layout,
    ModuleSpec,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

LINEAR_INPUTS = "linear inputs (trainable weights)"
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class Saved:
    """Bytes one block (or the model outside the blocks) keeps for backward, at a stage of the forward."""

    term: str
    nbytes: int
    stage: float = INPUT
    full_only: bool = False  # inputs of linear layers whose weights train (full fine-tuning)


@dataclass(frozen=True)
class Start:
    """Where gradients begin: the lowest trainable block (layout numbering) and the stage inside it.

    ``embeddings``: the embedding output requires a gradient (full fine-tuning, soft prompts at the input),
    so what the embeddings' dropout and norm save is kept too.
    """

    block: int
    stage: float
    embeddings: bool = False


@dataclass(frozen=True)
class Ctx:
    """Everything a recipe needs: the shapes, the dtype's size, the kernels and the device."""

    config: PretrainedConfig
    shape: Layout
    b: int
    s: int  # query positions (and the positions of everything else)
    s_kv: int  # key/value positions (s plus prefix tuning's virtual tokens)
    a: int  # bytes per activation element
    attention: str  # sdpa or eager (already resolved for the family)
    device: str
    full: bool
    notes: list[str] = field(default_factory=list)

    @property
    def t(self) -> int:
        return self.b * self.s

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def layer_norm(self, width: int | None = None) -> int:
        """nn.LayerNorm: its input and two statistics per position (fp32 on CUDA, activation dtype on CPU)."""
        stats = 2 * self.a * self.t if self.device == "cpu" else 8 * self.t
        return self.a * self.t * (width or self.shape.hidden_size) + stats

    def dropout(self, numel: int, p: float) -> int:
        """Dropout in train mode: CPU keeps its noise in the activation dtype, CUDA a 1-byte mask."""
        if p <= 0:
            return 0
        return numel * (self.a if self.device == "cpu" else 1)

    def sdpa_math(self, p_attn: float) -> bool:
        """Whether SDPA runs its math path: on CPU whenever attention dropout is active in training."""
        return self.attention == "sdpa" and self.device == "cpu" and p_attn > 0

    def core(self, p_attn: float, heads: int | None = None, kv_heads: int | None = None) -> int:
        """Bytes the attention kernel saves for one layer (q, k, v and what the kernel keeps)."""
        heads = heads or self.shape.num_heads
        kv_heads = kv_heads or self.shape.num_kv_heads
        d, b, s, s_kv = self.shape.head_dim, self.b, self.s, self.s_kv
        q, kv = b * s * heads * d, b * s_kv * kv_heads * d
        probs = b * heads * s * s_kv
        if self.attention == "sdpa" and not self.sdpa_math(p_attn):
            self.note(f"SDPA on {self.device.upper()} (flash/efficient kernel): q, k, v, the output and the fp32 "
                      "log-sum-exp are saved; no s^2 term")
            mask = 0
            if s != s_kv:  # extra key positions: an explicit mask (b x 1 x s x s_kv), k and v repeated to every head
                self.note("queries and keys differ in length: transformers passes an explicit mask to SDPA, which "
                          "keeps it, and repeats k and v to every query head")
                kv, mask = b * s_kv * heads * d, self.a * b * s * s_kv
            return self.a * (2 * q + 2 * kv) + 4 * b * heads * s + mask
        if self.attention == "sdpa":
            self.note("SDPA on CPU with attention dropout in training takes the math path: q, k, v upcast to "
                      "fp32 and three fp32 (b x heads x s^2) tensors (softmax, dropout noise, dropped) per layer")
            return 4 * (q + 2 * b * s_kv * heads * d) + 3 * 4 * probs
        self.note("eager attention: the softmax (b x heads x s^2) is saved, with the dropout's noise and output "
                  "when attention dropout is active")
        dropped = self.dropout(probs, p_attn) + self.a * probs if p_attn > 0 else 0
        return self.a * (q + 2 * kv) + self.a * probs + dropped

    def flash(self, p_attn: float) -> bool:
        """Whether the kernel's saved output is the o-projection's input (flash keeps the output)."""
        return self.attention == "sdpa" and not self.sdpa_math(p_attn)


def dropout_p(config: PretrainedConfig, names: tuple[str, ...]) -> float:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 0.0


# ------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """One family: the blocks (per stack: how many, what each saves) and what lies outside them."""

    stacks: list[tuple[int, list[Saved]]]
    embeddings: list[Saved]  # saved only when the embeddings' output requires a gradient
    head: list[Saved]  # final norm, head input: saved whenever the backbone back-propagates
    shared: list[Saved] = field(default_factory=list)  # one copy for all blocks (rotary tables)
    checkpoint_extra: int = 0  # tensors every checkpointed block keeps besides its input (shared ones once)


def _llama(c: Ctx) -> Recipe:
    """Llama-like block (RMSNorm upcast to fp32, rotary, gated SiLU MLP), as transformers writes it."""
    h, inter, t, a = c.shape.hidden_size, c.shape.intermediate_size, c.t, c.a
    norm = 4 * t * h + 4 * t
    p_attn = dropout_p(c.config, ("attention_dropout",))
    if c.attention == "eager":
        heads, d = c.shape.num_heads, c.shape.head_dim
        probs = c.b * heads * c.s * c.s_kv
        core = a * (t * heads * d + 2 * c.b * c.s_kv * heads * d) + 4 * probs + (a * probs if a != 4 else 0)
        c.note("eager attention: the fp32 softmax (b x heads x s^2) and its cast are saved; k and v are "
               "repeated to every query head")
    else:
        core = c.core(p_attn)
    block = [
        Saved("norms", norm, ATTN_NORM), Saved(LINEAR_INPUTS, a * t * h, ATTN_NORM, True),
        Saved(LINEAR_INPUTS, a * t * h, ATTN_IN, True),
        Saved("attention", core, ATTN_CORE),
        Saved(LINEAR_INPUTS, 0 if c.flash(p_attn) else a * t * c.shape.num_heads * c.shape.head_dim, ATTN_OUT, True),
        Saved("norms", norm, MLP_NORM), Saved(LINEAR_INPUTS, a * t * h, MLP_NORM, True),
        Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True),
        Saved("mlp", 3 * a * t * inter, MLP_ACT),
        Saved(LINEAR_INPUTS, a * t * inter, MLP_OUT, True),
    ]
    head = [Saved("outside blocks (final norm, head input)", norm), Saved(LINEAR_INPUTS, a * t * h, INPUT, True),
            Saved(LINEAR_INPUTS, a * t * h, INPUT, True)]
    shared = [Saved("outside blocks (rotary tables)", 2 * a * c.s * c.shape.head_dim, ATTN_CORE)]
    return Recipe([(c.shape.num_layers, block)], [], head, shared)


def _act_bytes(c: Ctx, name: str, numel: int) -> tuple[int, bool]:
    """Bytes an activation function saves, and whether its output is a new tensor the next linear saves."""
    if name in ("gelu_new", "gelu_pytorch_tanh_python", "gelu_fast"):
        c.note("tanh-GELU written in Python (GPT-2's gelu_new): four intermediate tensors of the MLP width")
        return 4 * c.a * numel, True
    if name == "relu":
        return c.a * numel, False  # relu saves its output, which the next linear reads
    return c.a * numel, True  # gelu, silu: their input


def _gpt2(c: Ctx) -> Recipe:
    cfg, h, inter, t, a = c.config, c.shape.hidden_size, c.shape.intermediate_size, c.t, c.a
    p_attn, p_res, p_emb = (dropout_p(cfg, (n,)) for n in ("attn_pdrop", "resid_pdrop", "embd_pdrop"))
    act, new_out = _act_bytes(c, cfg.activation_function, t * inter)
    block = [
        Saved("norms", c.layer_norm(), ATTN_NORM),
        Saved(LINEAR_INPUTS, a * t * h, ATTN_IN, True),
        Saved("attention", c.core(p_attn), ATTN_CORE),
        Saved(LINEAR_INPUTS, 0 if c.flash(p_attn) else a * t * h, ATTN_OUT, True),
        Saved("dropout", c.dropout(t * h, p_res), ATTN_POST),
        Saved("norms", c.layer_norm(), MLP_NORM),
        Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True),
        Saved("mlp", act, MLP_ACT),
        Saved(LINEAR_INPUTS, a * t * inter if new_out else 0, MLP_OUT, True),
        Saved("dropout", c.dropout(t * h, p_res), MLP_POST),
    ]
    embeddings = [Saved("outside blocks (embeddings)", c.dropout(t * h, p_emb))]
    head = [Saved("outside blocks (final norm, head input)", c.layer_norm()), Saved(LINEAR_INPUTS, a * t * h, INPUT, True)]
    return Recipe([(c.shape.num_layers, block)], embeddings, head)


def _bert(c: Ctx) -> Recipe:
    """BERT and RoBERTa: post-LN blocks, GELU; the masked-LM head has its own dense, GELU and LayerNorm."""
    cfg, h, inter, t, a = c.config, c.shape.hidden_size, c.shape.intermediate_size, c.t, c.a
    p_attn = dropout_p(cfg, ("attention_probs_dropout_prob",))
    p_hid = dropout_p(cfg, ("hidden_dropout_prob",))
    act, new_out = _act_bytes(c, str(getattr(cfg, "hidden_act", "gelu")), t * inter)
    block = [
        Saved(LINEAR_INPUTS, a * t * h, ATTN_IN, True),
        Saved("attention", c.core(p_attn), ATTN_CORE),
        Saved(LINEAR_INPUTS, 0 if c.flash(p_attn) else a * t * h, ATTN_OUT, True),
        Saved("dropout", c.dropout(t * h, p_hid), ATTN_POST), Saved("norms", c.layer_norm(), ATTN_POST),
        Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True),
        Saved("mlp", act, MLP_ACT),
        Saved(LINEAR_INPUTS, a * t * inter if new_out else 0, MLP_OUT, True),
        Saved("dropout", c.dropout(t * h, p_hid), MLP_POST), Saved("norms", c.layer_norm(), MLP_POST),
    ]
    embeddings = [Saved("outside blocks (embeddings)", c.layer_norm() + c.dropout(t * h, p_hid))]
    head_act, _ = _act_bytes(c, str(getattr(cfg, "hidden_act", "gelu")), t * h)
    head = [Saved(LINEAR_INPUTS, a * t * h, INPUT, True),
            Saved("outside blocks (head transform)", head_act + c.layer_norm()),
            Saved(LINEAR_INPUTS, a * t * h, INPUT, True)]
    return Recipe([(c.shape.num_layers, block)], embeddings, head)


def _opt(c: Ctx) -> Recipe:
    cfg, h, inter, t, a = c.config, c.shape.hidden_size, c.shape.intermediate_size, c.t, c.a
    p_attn, p, p_act = (dropout_p(cfg, (n,)) for n in ("attention_dropout", "dropout", "activation_dropout"))
    pre = bool(getattr(cfg, "do_layer_norm_before", True))
    act, _ = _act_bytes(c, cfg.activation_function, t * inter)
    act += c.dropout(t * inter, p_act)
    block = [
        Saved("norms", c.layer_norm() if pre else 0, ATTN_NORM),
        Saved(LINEAR_INPUTS, a * t * h, ATTN_IN, True),
        Saved("attention", c.core(p_attn), ATTN_CORE),
        Saved(LINEAR_INPUTS, 0 if c.flash(p_attn) else a * t * h, ATTN_OUT, True),
        Saved("dropout", c.dropout(t * h, p), ATTN_POST), Saved("norms", 0 if pre else c.layer_norm(), ATTN_POST),
        Saved("norms", c.layer_norm() if pre else 0, MLP_NORM),
        Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True),
        Saved("mlp", act, MLP_ACT),
        Saved(LINEAR_INPUTS, a * t * inter if (p_act > 0 or cfg.activation_function != "relu") else 0, MLP_OUT, True),
        Saved("dropout", c.dropout(t * h, p), MLP_POST), Saved("norms", 0 if pre else c.layer_norm(), MLP_POST),
    ]
    proj = getattr(cfg, "word_embed_proj_dim", h) or h
    embeddings = [Saved(LINEAR_INPUTS, a * t * proj if proj != h else 0, INPUT, True)]
    head = [Saved("outside blocks (final norm, head input)", c.layer_norm() if pre else 0),
            Saved(LINEAR_INPUTS, a * t * h if proj != h else 0, INPUT, True),
            Saved(LINEAR_INPUTS, a * t * proj, INPUT, True)]
    return Recipe([(c.shape.num_layers, block)], embeddings, head)


def _bloom(c: Ctx) -> Recipe:
    """BLOOM: eager attention with ALiBi, fused query_key_value, fp32 softmax, custom GELU (saves its input)."""
    cfg, h, inter, t, a = c.config, c.shape.hidden_size, c.shape.intermediate_size, c.t, c.a
    p_attn, p_hid = dropout_p(cfg, ("attention_dropout",)), dropout_p(cfg, ("hidden_dropout",))
    probs = c.b * c.shape.num_heads * c.s * c.s_kv
    core = 3 * a * t * h + 4 * probs + (a * probs if a != 4 else 0) + 2 * c.dropout(probs, p_attn)
    c.note("BLOOM: eager attention (no SDPA path); fused q/k/v, the fp32 softmax and its cast are saved")
    block = [
        Saved("norms", c.layer_norm(), ATTN_NORM),
        Saved(LINEAR_INPUTS, a * t * h, ATTN_IN, True),
        Saved("attention", core, ATTN_CORE),
        Saved(LINEAR_INPUTS, a * t * h, ATTN_OUT, True),
        Saved("dropout", c.dropout(t * h, p_hid), ATTN_POST),
        Saved("norms", c.layer_norm(), MLP_NORM),
        Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True),
        Saved("mlp", a * t * inter, MLP_ACT),
        Saved(LINEAR_INPUTS, a * t * inter, MLP_OUT, True),
        Saved("dropout", c.dropout(t * h, p_hid), MLP_POST),
    ]
    embeddings = [Saved("outside blocks (embeddings)", c.layer_norm())]
    head = [Saved("outside blocks (final norm, head input)", c.layer_norm()), Saved(LINEAR_INPUTS, a * t * h, INPUT, True)]
    return Recipe([(c.shape.num_layers, block)], embeddings, head)


def _t5(c: Ctx) -> Recipe:
    """T5: encoder and decoder stacks, RMS LayerNorm upcast to fp32, dropout after every sub-layer."""
    cfg, h, inter, t, a = c.config, c.shape.hidden_size, c.shape.intermediate_size, c.t, c.a
    p = dropout_p(cfg, ("dropout_rate",))
    inner = c.shape.num_heads * c.shape.head_dim
    norm = 4 * t * h + 4 * t + a * t * h
    gated = str(getattr(cfg, "feed_forward_proj", "relu")).startswith("gated")
    # gated (T5 v1.1, mT5): act(wi_0 x) * wi_1 x keeps what the activation saves, its output and wi_1's output
    act = (_gated_mlp(c, str(getattr(cfg, "dense_act_fn", "gelu_new"))) if gated else a * t * inter) \
        + c.dropout(t * inter, p)

    def attention(offset: float, causal: bool) -> list[Saved]:
        mask = c.s * c.s_kv if causal and c.sdpa_math(p) else 0
        return [Saved("norms", norm, offset + ATTN_NORM), Saved(LINEAR_INPUTS, a * t * h, offset + ATTN_NORM, True),
                Saved(LINEAR_INPUTS, a * t * h, offset + ATTN_IN, True),
                Saved("attention", c.core(p) + mask, offset + ATTN_CORE),
                Saved(LINEAR_INPUTS, 0 if c.flash(p) else a * t * inner, offset + ATTN_OUT, True),
                Saved("dropout", c.dropout(t * h, p), offset + ATTN_POST)]

    mlp = [Saved("norms", norm, MLP_NORM), Saved(LINEAR_INPUTS, a * t * h, MLP_NORM, True),
           Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True), Saved("mlp", act, MLP_ACT),
           Saved(LINEAR_INPUTS, a * t * inter, MLP_OUT, True), Saved("dropout", c.dropout(t * h, p), MLP_POST)]
    cross = [Saved("norms", norm, CROSS_NORM), Saved(LINEAR_INPUTS, a * t * h, CROSS_NORM, True),
             Saved(LINEAR_INPUTS, a * t * h, CROSS_IN, True),
             Saved("attention", c.core(p), CROSS_CORE),
             Saved(LINEAR_INPUTS, 0 if c.flash(p) else a * t * inner, CROSS_OUT, True),
             Saved("dropout", c.dropout(t * h, p), CROSS_POST)]
    n_enc = int(getattr(cfg, "num_layers", c.shape.num_layers // 2))
    n_dec = c.shape.num_layers - n_enc
    encoder = attention(0.0, False) + mlp
    decoder = attention(0.0, True) + cross + mlp
    final = norm + c.dropout(t * h, p)
    embeddings = [Saved("outside blocks (embeddings)", 2 * c.dropout(t * h, p)),
                  Saved(LINEAR_INPUTS, 8 * (c.s * c.s_kv + c.s * c.s), INPUT, True)]  # relative position buckets
    head = [Saved("outside blocks (final norms, dropout)", 2 * final),
            Saved(LINEAR_INPUTS, 2 * a * t * h, INPUT, True),  # final norms' weight gradient inputs
            Saved(LINEAR_INPUTS, a * t * h, INPUT, True),  # cross-attention k/v input (encoder output), once
            Saved(LINEAR_INPUTS, a * t * h, INPUT, True)]  # lm_head input
    # the position bias with the mask folded in (b x heads x s^2 per stack, one tensor shared by the blocks)
    bias = a * c.b * c.shape.num_heads * (c.s * c.s_kv + c.s * c.s)
    shared = []
    if c.flash(p):
        c.note("T5 on CUDA: the memory-efficient SDPA kernel keeps the position bias it is given as a mask "
               "(one b x heads x s^2 tensor per stack, shared by the blocks)")
        shared.append(Saved("outside blocks (position bias)", bias, INPUT))
    # checkpointed blocks keep the encoder output and the position bias once
    return Recipe([(n_enc, encoder), (n_dec, decoder)], embeddings, head, shared, checkpoint_extra=bias)


# ------------------------------------------------------------------ decoders of the generic layout (issue 12)
# Each recipe below was written from the tensors torch saves in transformers 5's code for the family (listed per
# block with ``saved_tensors_hooks``, storages counted once) and is checked against the fake-tensor simulation
# (tests/memory/test_activations_families.py, benchmarks/memory_grid.py). Pieces shared by several families:


def _rms(c: Ctx, rows: int, width: int, style: str) -> tuple[int, int]:
    r"""One RMSNorm over ``rows`` positions of ``width``: (bytes saved whenever its input requires a gradient,
    bytes saved only when its weight trains).

    - ``llama`` (``weight * (x.float() * rsqrt(mean(x^2))).to(dtype)``): the fp32 input and the fp32
      reciprocal RMS per row; the cast output (activation dtype) only for the weight's gradient;
    - ``gemma`` (``(x.float() * rsqrt) * (1 + weight.float())``, then cast): as llama, plus the fp32
      :math:`1 + w` (width); the fp32 normalised rows for the weight's gradient;
    - ``olmo`` (``(weight * x.float() * rsqrt).to(dtype)``): as llama; the fp32 normalised rows for the weight.
    """
    saved = 4 * rows * width + 4 * rows + (4 * width if style == "gemma" else 0)
    full = (c.a if style == "llama" else 4) * rows * width
    return saved, full


def _norm_items(c: Ctx, style: str, stage: float, feeds_linear: bool, width: int | None = None) -> list[Saved]:
    """A norm at ``stage`` (``layer`` = nn.LayerNorm, else an RMSNorm style of :func:`_rms`), with the linear
    input it produces when linears read its output (saved only when their weights train)."""
    h = width or c.shape.hidden_size
    if style == "layer":
        items = [Saved("norms", c.layer_norm(h), stage)]
    else:
        saved, full = _rms(c, c.t, h, style)
        items = [Saved("norms", saved, stage), Saved(LINEAR_INPUTS, full, stage, True)]
    if feeds_linear:  # the norm's output (activation dtype) is the next linears' input
        items.append(Saved(LINEAR_INPUTS, c.a * c.t * h, stage + (ATTN_IN - ATTN_NORM) / 2, True))
    return items


def _eager_core(c: Ctx, p_attn: float, softcap: bool) -> int:
    """transformers' ``eager_attention_forward``: q and the key/value repeated to every query head (matmul inputs),
    the tanh of soft-capped scores (activation dtype), the fp32 softmax, and the probabilities the second matmul
    reads (their cast, or dropout's output with its noise)."""
    heads, d = c.shape.num_heads, c.shape.head_dim
    probs = c.b * heads * c.s * c.s_kv
    c.note("eager attention: q, k and v repeated to every query head, the fp32 softmax (b x heads x s^2) and the "
           "probabilities the value matmul reads are saved" + (" (and the tanh of the soft-capped scores)"
                                                               if softcap else ""))
    core = c.a * (c.t * heads * d + 2 * c.b * c.s_kv * heads * d) + 4 * probs + (c.a * probs if softcap else 0)
    if p_attn > 0:
        return core + c.dropout(probs, p_attn) + c.a * probs
    return core + (c.a * probs if c.a != 4 else 0)


def _gated_mlp(c: Ctx, act: str) -> int:
    """``down(act(gate(x)) * up(x))``: what the activation saves, its output and the up projection's output."""
    inter = c.shape.intermediate_size
    act_bytes, _ = _act_bytes(c, act, c.t * inter)
    return act_bytes + 2 * c.a * c.t * inter


def _moe(c: Ctx) -> list[Saved]:
    r"""A routed MoE block as transformers 5 runs it (Mixtral-style, ``grouped_mm`` experts): each of the
    :math:`t` tokens goes to :math:`k` of :math:`E` experts, :math:`R = t k` routed rows.

    Router: the fp32 softmax over the experts (:math:`4tE`), the top-k indices (int64), the fp32 routing weights
    and their sum (renormalised top-k). Dispatch: three int64 row indices (:math:`8R` each) and the int32 expert
    offsets. Experts, per routed row: the fused gate/up output (:math:`2I`, read by the activation and the
    product), the activation's output (:math:`I`), the experts' output and the fp32 routing weight that scales it.
    With trainable expert weights: their inputs (the gathered rows, :math:`aRh`, and the product, :math:`aRI`).
    """
    h, inter, t, a = c.shape.hidden_size, c.shape.intermediate_size, c.t, c.a
    experts, k = c.shape.num_experts, c.shape.experts_per_token
    rows = t * k
    c.note(f"mixture of experts: each token is routed to {k} of {experts} experts ({rows:,} routed rows per MoE "
           "block); router softmax and indices, per-row gate/up, activation and expert outputs are saved")
    router = 4 * t * experts + 8 * t * k + 4 * t + 4 * t * k + 3 * 8 * rows + 4 * experts
    experts_saved = a * rows * (2 * inter + inter + h) + 4 * rows
    return [Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True),
            Saved("mlp (router)", router, MLP_ACT), Saved("mlp (routed experts)", experts_saved, MLP_ACT),
            Saved(LINEAR_INPUTS, a * rows * (h + inter), MLP_OUT, True)]


def _decoder(c: Ctx, norm: str, *, qk_norm: str | None = None, sandwich: bool = False, post_only: bool = False,
             softcap: bool = False, fused_qkv: bool = False, p_attn: float = 0.0, p_resid: float = 0.0,
             p_embed: float = 0.0, act: str = "silu", gated: bool = True, head_extra: list[Saved] | None = None,
             parallel: bool = False) -> Recipe:
    """A decoder block of the Llama lineage, with the variations of the newer families as switches.

    ``norm``: the norms' kind (``llama``, ``gemma``, ``olmo`` RMSNorms, or ``layer`` for nn.LayerNorm);
    ``qk_norm``: RMSNorm on the queries and keys, ``head`` (per head, Qwen3) or ``full`` (the whole projection,
    OLMo-2); ``sandwich``: norms after attention and MLP too (Gemma-2); ``post_only``: norms only after them
    (OLMo-2); ``softcap``: tanh soft-capping of the scores (eager); ``fused_qkv``: q, k, v are views of one
    projection (Phi-3), so the value's view keeps the whole fused output alive and the o-projection reads a copy;
    dropouts on scores, residual branches and embeddings; ``gated``: gated MLP (else ``down(act(up(x)))``);
    ``parallel``: attention and MLP both read the block input (GPT-NeoX's parallel residual), so the MLP's norm
    saves only its statistics (its input is the attention norm's, saved once).

    Where gradients start inside a block the stages are a total order, which over-counts in that one block when the
    trainable module's input does not reach what follows it: Qwen3's k-norm when only q and v train, a parallel
    MLP when only attention trains (about 2% on a two-block model, a fraction of a block on a real one).
    """
    shape, t, a, h = c.shape, c.t, c.a, c.shape.hidden_size
    heads, kv, d, inter = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate_size
    pre = not post_only
    if c.attention == "eager":
        core = _eager_core(c, p_attn, softcap)
    else:
        core = c.core(p_attn)
        if fused_qkv and c.flash(p_attn):
            c.note("fused qkv projection: the value SDPA keeps is a view of the fused output, which stays alive "
                   "whole (b x s x (heads + 2 kv_heads) x head_dim)")
            core += a * t * (heads + kv) * d
    extra_core: list[Saved] = []
    if qk_norm is not None:
        style = "llama" if qk_norm == "head" else "olmo"
        for n in (heads, kv):
            rows, width = (t * n, d) if qk_norm == "head" else (t, n * d)
            saved, full = _rms(c, rows, width, style)
            extra_core += [Saved("norms", saved, ATTN_CORE), Saved(LINEAR_INPUTS, full, ATTN_CORE, True)]
    o_input = a * t * heads * d if (fused_qkv or not c.flash(p_attn)) else 0
    block: list[Saved] = []
    if pre:
        block += _norm_items(c, norm, ATTN_NORM, True)
    else:
        block.append(Saved(LINEAR_INPUTS, a * t * h, ATTN_IN, True))  # the block input feeds q, k, v directly
    block += extra_core + [Saved("attention", core, ATTN_CORE), Saved(LINEAR_INPUTS, o_input, ATTN_OUT, True)]
    if sandwich or post_only:
        block += _norm_items(c, norm, ATTN_POST, False)
    block.append(Saved("dropout", c.dropout(t * h, p_resid), ATTN_POST))
    if pre and parallel:
        block += [Saved("norms", c.layer_norm() - a * t * h, MLP_NORM),
                  Saved(LINEAR_INPUTS, a * t * h, MLP_NORM + (ATTN_IN - ATTN_NORM) / 2, True)]
    elif pre:
        block += _norm_items(c, norm, MLP_NORM, True)
    else:
        block.append(Saved(LINEAR_INPUTS, a * t * h, MLP_IN, True))
    if shape.num_experts:
        block += _moe(c)
    elif gated:
        block += [Saved("mlp", _gated_mlp(c, act), MLP_ACT), Saved(LINEAR_INPUTS, a * t * inter, MLP_OUT, True)]
    else:
        act_bytes, new_out = _act_bytes(c, act, t * inter)
        block += [Saved("mlp", act_bytes, MLP_ACT),
                  Saved(LINEAR_INPUTS, a * t * inter if new_out else 0, MLP_OUT, True)]
    if sandwich or post_only:
        block += _norm_items(c, norm, MLP_POST, False)
    block.append(Saved("dropout", c.dropout(t * h, p_resid), MLP_POST))
    final = _norm_items(c, norm, INPUT, True)
    head = [Saved("outside blocks (final norm, head input)" if i.term == "norms" else i.term, i.nbytes, INPUT,
                  i.full_only) for i in final] + (head_extra or [])
    embeddings = [Saved("outside blocks (embeddings)", c.dropout(t * h, p_embed))]
    rope = getattr(c.config, "rope_parameters", None) or {}
    factor = getattr(c.config, "partial_rotary_factor", None) or (rope.get("partial_rotary_factor")
                                                                   if isinstance(rope, dict) else None)
    rotary = int(d * float(factor or 1.0))
    shared = [Saved("outside blocks (rotary tables)", 2 * a * c.s * rotary, ATTN_CORE)]
    return Recipe([(shape.num_layers, block)], embeddings, head, shared)


def _qwen3(c: Ctx) -> Recipe:
    """Qwen3: Llama's block with an RMSNorm on each head of the queries and keys (before rotary)."""
    return _decoder(c, "llama", qk_norm="head", p_attn=dropout_p(c.config, ("attention_dropout",)))


def _olmo2(c: Ctx) -> Recipe:
    """OLMo-2: norms after attention and MLP only (none before), RMSNorm on the whole q and k projections."""
    return _decoder(c, "olmo", qk_norm="full", post_only=True, p_attn=dropout_p(c.config, ("attention_dropout",)))


def _gemma2(c: Ctx) -> Recipe:
    """Gemma-2: four Gemma RMSNorms per block (before and after attention and MLP), eager attention with
    tanh soft-capped scores, gated tanh-GELU MLP; the logits are soft-capped too (their tanh is saved)."""
    cfg = c.config
    head_extra = []
    if getattr(cfg, "final_logit_softcapping", None):
        c.note("final logit soft-capping: the tanh of the logits (b x s x vocab, activation dtype) is saved")
        head_extra.append(Saved("outside blocks (logit soft-capping)", c.a * c.t * c.shape.vocab_size))
    return _decoder(c, "gemma", sandwich=True, softcap=bool(getattr(cfg, "attn_logit_softcapping", None)),
                    p_attn=dropout_p(cfg, ("attention_dropout",)),
                    act=str(getattr(cfg, "hidden_activation", None) or cfg.hidden_act), head_extra=head_extra)


def _phi3(c: Ctx) -> Recipe:
    """Phi-3: Llama's block with fused ``qkv_proj`` and ``gate_up_proj`` (the gate and up halves are views of
    one output, which the activation and the product keep: the same bytes as two projections)."""
    cfg = c.config
    return _decoder(c, "llama", fused_qkv=True, p_attn=dropout_p(cfg, ("attention_dropout",)),
                    p_resid=dropout_p(cfg, ("resid_pdrop",)), p_embed=dropout_p(cfg, ("embd_pdrop",)))


def _starcoder2(c: Ctx) -> Recipe:
    """StarCoder2: LayerNorms with bias, GQA with rotary, ``c_proj(gelu_tanh(c_fc(x)))``, dropout on the scores,
    the residual branches and the embeddings."""
    cfg = c.config
    norm = "layer" if getattr(cfg, "norm_type", "layer_norm") == "layer_norm" else "llama"
    return _decoder(c, norm, gated=False, act=str(cfg.hidden_act), p_attn=dropout_p(cfg, ("attention_dropout",)),
                    p_resid=dropout_p(cfg, ("residual_dropout",)), p_embed=dropout_p(cfg, ("embedding_dropout",)))


def _gpt_neox(c: Ctx) -> Recipe:
    """GPT-NeoX (Pythia): LayerNorms, fused ``query_key_value`` (the value's view keeps it whole), partial rotary,
    ``dense_4h_to_h(gelu(dense_h_to_4h(x)))``; with the parallel residual both norms read the block input."""
    cfg = c.config
    parallel = bool(getattr(cfg, "use_parallel_residual", True))
    if parallel:
        c.note("parallel residual (GPT-NeoX): attention and MLP read the same block input; its second LayerNorm "
               "keeps only its statistics")
    return _decoder(c, "layer", fused_qkv=True, gated=False, act=str(cfg.hidden_act), parallel=parallel,
                    p_attn=dropout_p(cfg, ("attention_dropout",)), p_resid=dropout_p(cfg, ("hidden_dropout",)))


def _mixtral(c: Ctx) -> Recipe:
    """Mixtral: Llama's attention with a routed mixture of experts in place of the MLP (:func:`_moe`)."""
    return _decoder(c, "llama", p_attn=dropout_p(c.config, ("attention_dropout",)))


RECIPES: dict[str, Callable[[Ctx], Recipe]] = {
    "llama": _llama, "mistral": _llama, "qwen2": _llama, "gpt2": _gpt2, "bert": _bert, "roberta": _bert,
    "opt": _opt, "bloom": _bloom, "t5": _t5, "mt5": _t5,
    "qwen3": _qwen3, "olmo2": _olmo2, "gemma2": _gemma2, "phi3": _phi3, "starcoder2": _starcoder2,
    "mixtral": _mixtral, "gpt_neox": _gpt_neox,
}
LOSS_IN_MODEL_DTYPE = ("bert", "roberta", "t5", "mt5")


def recipe_of(c: Ctx) -> Recipe:
    """The family's hand recipe, else the one derived from the model's own code (:mod:`survey_utils.memory.derived`,
    which imports torch; a zoo snapshot stores its model's)."""
    hand = RECIPES.get(c.shape.family)
    if hand is not None:
        return hand(c)
    from survey_utils.memory.derived import derived_recipe

    return derived_recipe(c.config, "fp32" if c.a == 4 else "bf16", c.attention, c.device).recipe(c)


# ----------------------------------------------------------------------------------- where gradients start
def module_stage(spec: ModuleSpec) -> float:
    """The stage of a block at which a module sits: :attr:`ModuleSpec.stage` (the rule lives on the layout)."""
    return spec.stage


def start_of(specs: list[ModuleSpec]) -> Start | None:
    """The lowest (block, stage) among the modules a method's trainable parameters join."""
    placed = [(s.layer, module_stage(s)) for s in specs if s.layer is not None]
    if not placed:
        return None
    block, stage = min(placed)
    return Start(block, stage)


def trainable_start(method: Any, config: PretrainedConfig, hp: dict[str, Any]) -> Start:
    """Where the method's gradients start: a method training the whole model at the embeddings; others at
    the lowest of :meth:`Method.sites` (the input for methods that add positions)."""
    if method.trains_whole_model:
        return Start(0, INPUT, embeddings=True)
    sites = method.sites(config, **hp)
    if sites == "input":
        return Start(0, INPUT, embeddings=True)
    return (start_of(list(sites)) if sites else None) or Start(0, INPUT)


# ----------------------------------------------------------------------------------------- the total
@dataclass(frozen=True)
class Activations:
    terms: dict[str, int]  # summed over the blocks that save, and outside them
    largest_block: int  # one block's bytes (what checkpointing rebuilds at a time)
    saving_blocks: int  # blocks that save anything (and keep their input when checkpointed)
    checkpoint_extra: int


def saved_activations(c: Ctx, start: Start) -> Activations:
    """Bytes saved for backward by the backbone, by term, given where gradients start."""
    recipe = recipe_of(c)
    terms: dict[str, int] = {}

    def add(items: list[Saved], above: float | None = None) -> int:
        total = 0
        for item in items:
            if item.full_only and not c.full:
                continue
            if not c.full and above is not None and item.stage <= above:
                continue
            if item.nbytes:
                terms[item.term] = terms.get(item.term, 0) + item.nbytes
                total += item.nbytes
        return total

    largest, saving, layer, core_grad = 0, 0, 0, False
    for count, block in recipe.stacks:
        for _ in range(count):
            if c.full or layer > start.block:
                got = add(block)
                core_grad = True
            elif layer == start.block:
                got = add(block, start.stage)
                core_grad = core_grad or start.stage < ATTN_CORE
            else:
                got = 0
            largest = max(largest, got)
            saving += got > 0
            layer += 1
    if c.full or start.embeddings:
        add(recipe.embeddings)
    add(recipe.head)
    if core_grad:
        add(recipe.shared)
    return Activations(terms, largest, saving, recipe.checkpoint_extra if saving else 0)
