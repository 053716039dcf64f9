"""Layers of the LoRA family (chapter 04); the methods are registered in ``methods/reparameterized.py``.

Every layer here wraps a frozen linear layer (``nn.Linear`` or GPT-2's transposed ``Conv1D``) and adds an
update :math:`\\Delta W` built from a few trainable tensors:

- :class:`LoRALinear` (LoRA, rsLoRA): :math:`\\Delta W = \\frac{\\alpha}{r} B A`;
- :class:`DoRALinear` (DoRA): LoRA's updated weight, renormalised and rescaled by a trained magnitude;
- :class:`SVDLinear` (AdaLoRA): :math:`\\Delta W = P\\,\\mathrm{diag}(\\lambda)\\,Q`, ranks pruned by
  :class:`RankAllocator`;
- :class:`VeRALinear` (VeRA): :math:`\\Delta W = \\mathrm{diag}(b)\\,B\\,\\mathrm{diag}(d)\\,A` with A, B
  frozen, random and shared by every layer;
- :class:`LoHaLinear` (LoHa): :math:`\\Delta W = (W_{1a} W_{1b}) \\odot (W_{2a} W_{2b})`;
- :class:`LoKrLinear` (LoKr): :math:`\\Delta W = W_1 \\otimes W_2`;
- :class:`KronALinear` (KronA): :math:`\\Delta W = s\\,(A \\otimes B)`.

LoRA and DoRA write their own ``forward`` and ``merge``; the others share :class:`DeltaLinear`: ``forward``
adds the update's output to the base output, ``merge`` adds :math:`\\Delta W` into the base weight and
``unmerge`` takes it out again. New tensors are created with
``new_parameter`` on the base weight's device and dtype, so the layers build on ``meta`` and under
``FakeTensorMode`` too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from survey_utils.methods.common import linear_dims, new_parameter
from survey_utils.methods.layers.wrapping import ShowsBaseWeight
from survey_utils.methods.shapes import factorization, lokr_shapes


def kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s default init, the one peft uses for LoRA's A and LyCORIS' factors."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LoRALinear(ShowsBaseWeight):
    r"""LoRA around a frozen linear layer (Hu et al. 2021, arXiv:2106.09685).

    ::

        x ──► [ W0  (frozen, d_out × d_in) ] ─────────────────────┐
        │                                                         (+) ──► h
        └──► dropout ─► [ A (r × d_in) ] ─► [ B (d_out × r) ] ─ × α/r ┘

    .. math:: h = W_0 x + \frac{\alpha}{r} B A x

    A starts like a default linear layer (Kaiming-uniform) and B at zero, so at initialisation
    ``h = W0 x``: training starts from the pretrained model. With ``use_rslora`` the scale is
    :math:`\alpha/\sqrt{r}` (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732). ``merge`` adds
    :math:`\frac{\alpha}{r} BA` into ``W0`` so that inference has no extra cost.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        weight = base_layer.weight
        self.lora_A = new_parameter((r, self.in_features), weight,
                                    lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        self.lora_B = new_parameter((self.out_features, r), weight, nn.init.zeros_)
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """:math:`\\frac{\\alpha}{r} B A`, laid out like the base weight."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        low_rank = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return result + (low_rank * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


class DoRALinear(LoRALinear):
    r"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

    .. math:: W' = m \odot \frac{W_0 + \frac{\alpha}{r} B A}{\lVert W_0 + \frac{\alpha}{r} B A \rVert_c}

    The direction is LoRA's updated weight, normalised row by row (one norm per output feature, peft's
    ``torch.linalg.norm(W, dim=1)`` on the ``d_out x d_in`` weight; the paper's "column-wise" norm
    of its ``d_in x d_out`` convention); the magnitude ``m`` (``lora_magnitude``, d_out) trains.
    ``m`` starts at :math:`\lVert W_0\rVert_c` and B at zero, so ``W' = W0`` at initialisation. As in the
    paper (section 4.3) and peft, the norm is detached: it follows :math:`\Delta W` but gets no gradient.
    Forward, like peft's: :math:`h = W_0x + (\frac{m}{n} - 1) W_0 x + \frac{m}{n}\frac{\alpha}{r} BAx`
    (bias untouched). The norm needs :math:`W_0 + \Delta W` at full size for every adapted layer, the
    extra memory and time DoRA costs over LoRA.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self.lora_magnitude = new_parameter((self.out_features,), base_layer.weight,
                                            lambda t: t.copy_(torch.linalg.norm(self._weight(), dim=1)))
        self._merge_norm: torch.Tensor | None = None

    def _weight(self) -> torch.Tensor:
        """The base weight as ``d_out x d_in``."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """:math:`\\lVert W_0 + \\frac{\\alpha}{r} BA \\rVert` per output feature, detached."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return torch.linalg.norm(self._weight() + delta.to(self._weight().dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        dropped = self.lora_dropout(x).to(self.lora_A.dtype)
        scale = self.lora_magnitude / self.weight_norm()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result - bias if bias is not None else result
        else:
            base = nn.functional.linear(dropped, self._weight())
        low_rank = dropped @ self.lora_A.T @ self.lora_B.T
        return result + ((scale - 1) * base + scale * low_rank * self.scaling).to(result.dtype)

    def _set_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.weight.copy_(weight.T if self.fan_in_fan_out else weight)

    @torch.no_grad()
    def merge(self) -> None:
        """:math:`W \\leftarrow \\frac{m}{n}(W_0 + \\Delta W)`, keeping the norm n to undo it exactly."""
        if not self.merged:
            delta = ((self.lora_B @ self.lora_A) * self.scaling).to(self._weight().dtype)
            self._merge_norm = self.weight_norm()
            factor = (self.lora_magnitude / self._merge_norm)[:, None]
            self._set_weight(factor * (self._weight() + delta))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self._merge_norm is not None:
            delta = ((self.lora_B @ self.lora_A) * self.scaling).to(self._weight().dtype)
            factor = (self.lora_magnitude / self._merge_norm)[:, None]
            self._set_weight(self._weight() / factor - delta)
            self.merged = False
            self._merge_norm = None


class DeltaLinear(ShowsBaseWeight):
    """A frozen linear layer plus a trained update :math:`\\Delta W` (laid out ``d_out x d_in``).

    Subclasses define :meth:`delta_weight`; :meth:`delta_output` defaults to ``x @ delta_weight().T`` and
    is overridden where the update has a cheaper factored product.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.delta_output(x).to(result.dtype)

    def _base_delta(self) -> torch.Tensor:
        delta = self.delta_weight()
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold :math:`\\Delta W` into the base weight: inference then costs what the base layer costs."""
        if not self.merged:
            self.base_layer.weight += self._base_delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self._base_delta()
            self.merged = False


class SVDLinear(DeltaLinear):
    r"""AdaLoRA's SVD-form update (Zhang et al. 2023, arXiv:2303.10512).

    .. math:: h = W_0 x + \frac{\alpha}{r_0 + 10^{-5}}\, P\,\mathrm{diag}(\lambda)\, Q\, x

    with ``lora_B`` = P (d_out x r), ``lora_E`` = :math:`\lambda` (r x 1), ``lora_A`` = Q (r x d_in). P and Q
    start from :math:`\mathcal N(0, 0.02^2)`, :math:`\lambda` at zero (so ``h = W0 x`` at init); a
    regulariser (:func:`orthogonal_regularization`) keeps P and Q near-orthogonal, and
    :class:`RankAllocator` zeroes the least important :math:`\lambda_i` during training. As in peft the
    scale divides by the *initial* rank ``ranknum``, a frozen one-element parameter (peft counts it in
    the model's total; so do we). ``lora_alpha = 0`` means a scale of ``r``, as in peft.
    """

    def __init__(self, base_layer: nn.Module, init_r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        self.r = init_r
        self.lora_A = new_parameter((init_r, self.in_features), weight, lambda t: nn.init.normal_(t, 0.0, 0.02))
        self.lora_E = new_parameter((init_r, 1), weight, nn.init.zeros_)
        self.lora_B = new_parameter((self.out_features, init_r), weight, lambda t: nn.init.normal_(t, 0.0, 0.02))
        self.ranknum = new_parameter((1,), weight, lambda t: t.fill_(float(init_r)))
        self.ranknum.requires_grad_(False)
        self.scaling = lora_alpha if lora_alpha > 0 else float(init_r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        return (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + 1e-5)

    def active_rank(self) -> int:
        """How many singular values are not pruned."""
        return int((self.lora_E.detach() != 0).sum())


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    r"""AdaLoRA's :math:`R = \frac{1}{n}\sum (\lVert P^\top P - I\rVert_F + \lVert Q Q^\top - I\rVert_F)`.

    Add ``orth_reg_weight * R`` to the loss (peft adds it inside ``forward`` when the model returns a loss).
    """
    terms = []
    for module in model.modules():
        if isinstance(module, SVDLinear):
            for cov in (module.lora_A @ module.lora_A.T, module.lora_B.T @ module.lora_B):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                      device=cov.device)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class RankAllocator:
    r"""AdaLoRA's budget: prune the least important singular triplets during training.

    Importance of a parameter entry: sensitivity :math:`I = |w \cdot \partial L/\partial w|`, smoothed
    :math:`\bar I_t = \beta_1 \bar I_{t-1} + (1-\beta_1) I_t`, and its uncertainty
    :math:`\bar U_t = \beta_2 \bar U_{t-1} + (1-\beta_2)|I_t - \bar I_t|`; score :math:`s = \bar I \bar U`.
    A triplet i scores :math:`s(\lambda_i) + \mathrm{mean}_j s(Q_{ij}) + \mathrm{mean}_k s(P_{ki})`. The total
    budget falls from ``init_r`` per layer to ``target_r`` per layer on a cubic schedule between ``tinit``
    and ``total_step - tfinal``; every ``deltaT`` steps the lowest-scoring :math:`\lambda_i` are set to
    zero, wherever they are: layers compete for rank. Call :meth:`update_and_allocate` after
    ``loss.backward()`` and ``optimizer.step()``, before ``zero_grad()`` (peft's ``RankAllocator`` and
    ``AdaLoraModel.update_and_allocate``, written from the paper's Algorithm 1).
    """

    def __init__(self, model: nn.Module, target_r: int, tinit: int, tfinal: int, total_step: int,
                 deltaT: int, beta1: float, beta2: float, **_: Any) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}
        self.tinit, self.tfinal, self.total_step, self.deltaT = tinit, tfinal, total_step, deltaT
        self.beta1, self.beta2 = beta1, beta2
        self.init_budget = sum(m.r for m in self.layers.values())
        self.target_budget = target_r * len(self.layers)
        self.rank_pattern: dict[str, torch.Tensor] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask now?)``: init budget during warm-up, cubic decrease, then the target."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        progress = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % self.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        for name, layer in self.layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, part)
                if p.grad is None:
                    continue
                key = (name, part)
                ipt = (p * p.grad).abs()
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Score of each singular triplet, per layer (vector of length ``init_r``)."""
        scores = {}
        for name in self.layers:
            def score(part: str, name: str = name) -> torch.Tensor:
                return self.exp_avg_ipt[(name, part)] * self.exp_avg_unc[(name, part)]
            scores[name] = (score("lora_E").view(-1) + score("lora_A").mean(dim=1)
                            + score("lora_B").mean(dim=0))
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        scores = self.triplet_scores()
        k = self.init_budget - budget
        if k <= 0:
            return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        pattern = {}
        for name, s in scores.items():
            keep = s > threshold
            self.layers[name].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[name] = keep
        return pattern

    @torch.no_grad()
    def update_and_allocate(self, step: int) -> int:
        """Update importance, prune to this step's budget; returns the budget (total rank)."""
        final = self.total_step - self.tfinal
        if step < final:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(budget)
            return budget
        if step == final:
            self.update_ipt()
            self.rank_pattern = self.mask_to_budget(self.target_budget)
            self.reset_ipt()
        elif self.rank_pattern is not None:
            for name, keep in self.rank_pattern.items():
                self.layers[name].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        return self.target_budget

    def ranks(self) -> dict[str, int]:
        """The rank each layer holds now (its number of non-zero :math:`\\lambda_i`)."""
        return {name: layer.active_rank() for name, layer in self.layers.items()}


class VeRALinear(DeltaLinear):
    r"""VeRA (Kopiczko et al. 2024, arXiv:2310.11454).

    .. math:: h = W_0 x + \mathrm{diag}(b)\, B\, \mathrm{diag}(d)\, A\, x

    A (r x d_in_max) and B (d_out_max x r) are frozen random matrices shared by every adapted layer (each
    layer slices the corner it needs), stored as buffers: not parameters, so not counted, as in peft.
    Only the vectors d (``vera_lambda_d``, r, init ``d_initial``) and b (``vera_lambda_b``, d_out, init 0)
    train: r + d_out numbers per layer.
    """

    def __init__(self, base_layer: nn.Module, shared: VeRAProjections, r: int, vera_dropout: float,
                 d_initial: float) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        self.shared = (shared,)  # a tuple: a reference, not a second registration of the shared buffers
        self.vera_lambda_b = new_parameter((self.out_features,), weight, nn.init.zeros_)
        self.vera_lambda_d = new_parameter((r,), weight, lambda t: t.fill_(d_initial))
        self.vera_dropout = nn.Dropout(vera_dropout) if vera_dropout > 0 else nn.Identity()

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.shared[0]
        return shared.vera_A[:, : self.in_features], shared.vera_B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        x = self.vera_dropout(x).to(self.vera_lambda_d.dtype)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)


class VeRAProjections(nn.Module):
    """The frozen random A (r x d_in) and B (d_out x r) VeRA shares, Kaiming-uniform from one seed.

    Drawn on the CPU from ``torch.Generator().manual_seed(projection_prng_key)``, A then B (peft's order),
    then copied to ``like``'s device and dtype; left uninitialised on ``meta``.
    """

    def __init__(self, r: int, max_in: int, max_out: int, projection_prng_key: int, like: torch.Tensor) -> None:
        super().__init__()
        a = torch.empty((r, max_in), device=like.device, dtype=like.dtype)
        b = torch.empty((max_out, r), device=like.device, dtype=like.dtype)
        if like.device.type != "meta":
            generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
            with torch.no_grad():
                for tensor in (a, b):
                    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(tensor.shape[1])
                    cpu = torch.empty(tensor.shape, device="cpu").uniform_(-bound, bound, generator=generator)
                    tensor.copy_(cpu)
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)


class _LyCORISLinear(DeltaLinear):
    """LoHa and LoKr: scale alpha / r, rank dropout on output rows and module dropout while training."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float,
                 module_dropout: float) -> None:
        super().__init__(base_layer)
        self.r, self.scaling = r, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rescale_rank_dropout = True

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            drop = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rescale_rank_dropout:
                drop = drop / drop.mean()
            delta = delta * drop[:, None]
        return F.linear(x.to(delta.dtype), delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.merged and self.module_dropout > 0 and torch.rand(1) <= self.module_dropout:
            return self.base_layer(x)
        return super().forward(x)


class LoHaLinear(_LyCORISLinear):
    r"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS).

    .. math:: \Delta W = \frac{\alpha}{r} (W_{1a} W_{1b}) \odot (W_{2a} W_{2b})

    Four factors (d_out x r, r x d_in, twice): 2 r (d_in + d_out) parameters, twice LoRA's, but the
    Hadamard product of two rank-r matrices can reach rank :math:`r^2`. Init as peft: three factors
    Kaiming-uniform, :math:`W_{2b} = 0`, so :math:`\Delta W = 0` at the start.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, rank_dropout, module_dropout)
        w, d_out, d_in = base_layer.weight, self.out_features, self.in_features
        self.hada_w1_a = new_parameter((d_out, r), w, kaiming_)
        self.hada_w1_b = new_parameter((r, d_in), w, kaiming_)
        self.hada_w2_a = new_parameter((d_out, r), w, kaiming_)
        self.hada_w2_b = new_parameter((r, d_in), w, nn.init.zeros_)

    def delta_weight(self) -> torch.Tensor:
        return HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)


class HadamardProduct(torch.autograd.Function):
    r""":math:`s\,(W_{1a}W_{1b}) \odot (W_{2a}W_{2b})`, saving only the four factors for backward.

    Plain autograd would keep both full-size products (2 d_out d_in numbers per layer) until backward; like
    peft's ``HadaWeight`` this recomputes them there, trading a little time for that memory.
    """

    @staticmethod
    def forward(ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class LoKrLinear(_LyCORISLinear):
    r"""LoKr: Kronecker product of two factors (LyCORIS, Yeh et al. 2024, arXiv:2309.14859).

    .. math:: \Delta W = \frac{\alpha}{r}\, W_1 \otimes W_2,\quad W_1 \in \mathbb R^{a\times c},
              W_2 \in \mathbb R^{b \times d},\ ab = d_\text{out},\ cd = d_\text{in}

    The sides come from :func:`factorization` (near the square root, or ``decompose_factor``). Each factor is
    stored full or, when r is small against it, as a rank-r product (:func:`lokr_shapes`). The rank of a
    Kronecker product is the product of the ranks, so a few hundred numbers can give a full-rank update.
    Init as peft: W1 (or its first factor) zero, the rest Kaiming-uniform.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, decompose_both: bool = False, decompose_factor: int = -1,
                 rank_dropout_scale: bool = False) -> None:
        super().__init__(base_layer, r, alpha, rank_dropout, module_dropout)
        self.rescale_rank_dropout = rank_dropout_scale
        w = base_layer.weight
        (a, c), (b, d), full_w1, full_w2 = lokr_shapes(self.in_features, self.out_features, r,
                                                       decompose_both, decompose_factor)
        if full_w1:
            self.lokr_w1 = new_parameter((a, c), w, nn.init.zeros_)
        else:
            self.lokr_w1_a = new_parameter((a, r), w, nn.init.zeros_)
            self.lokr_w1_b = new_parameter((r, c), w, kaiming_)
        if full_w2:
            self.lokr_w2 = new_parameter((b, d), w, kaiming_)
        else:
            self.lokr_w2_a = new_parameter((b, r), w, kaiming_)
            self.lokr_w2_b = new_parameter((r, d), w, kaiming_)

    def _factor(self, index: int) -> torch.Tensor:
        full = getattr(self, f"lokr_w{index}", None)
        if full is not None:
            return full
        return getattr(self, f"lokr_w{index}_a") @ getattr(self, f"lokr_w{index}_b")

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self._factor(1), self._factor(2)) * self.scaling


class KronALinear(DeltaLinear):
    r"""KronA: a Kronecker-product update (Edalati et al. 2022, arXiv:2212.10650).

    .. math:: h = W_0 x + s\,(A \otimes B)\,x,\quad A \in \mathbb R^{a_1 \times a_2},
              B \in \mathbb R^{b_1 \times b_2},\ a_1 b_1 = d_\text{out},\ a_2 b_2 = d_\text{in}

    Computed without forming :math:`A \otimes B`: reshaping x to :math:`X \in \mathbb R^{a_2\times b_2}`
    gives :math:`(A \otimes B)\,x = \mathrm{vec}(A X B^\top)`. A starts Kaiming-uniform and B at zero, so the
    update is zero at initialisation (as LoRA's B). Unlike LoKr neither factor is itself low rank.
    """

    def __init__(self, base_layer: nn.Module, krona_factor: int, scale: float) -> None:
        super().__init__(base_layer)
        w = base_layer.weight
        a1, b1 = factorization(self.out_features, krona_factor)
        a2, b2 = factorization(self.in_features, krona_factor)
        self.krona_A = new_parameter((a1, a2), w, kaiming_)
        self.krona_B = new_parameter((b1, b2), w, nn.init.zeros_)
        self.scale = scale

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.krona_A, self.krona_B) * self.scale

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.krona_A, self.krona_B
        grid = x.to(a.dtype).reshape(*x.shape[:-1], a.shape[1], b.shape[1])
        return (a @ grid @ b.T).reshape(*x.shape[:-1], self.out_features) * self.scale
