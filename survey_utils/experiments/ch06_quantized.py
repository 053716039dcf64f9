"""Chapter 06's experiments: NF4 and int8 against bitsandbytes, QLoRA trained, LoftQ's error, the claims recomputed.

Each helper names the section of ``notebooks/06_quantized_memory_efficient.py`` that shows it. The
quantizers are :mod:`survey_utils.quantization`; the layers :mod:`survey_utils.methods.layers.quantized`.
"""

from __future__ import annotations

import copy
import csv
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from survey_utils import quantization as Q
from survey_utils.errors import SurveyError

CLAIMS_CSV = Path(__file__).resolve().parents[2] / "data" / "quantization_claims.csv"


def real_shaped_weight(rows: int = 896, cols: int = 4864, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    """A Gaussian weight of a real model's shape (default: Qwen2.5-0.5B's MLP, 896 x 4864) with the zoo's init std.

    Defined for chapter 06, section "NF4 from scratch" (no pretrained weights are downloaded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * std


def nf4_vs_bitsandbytes(weight: torch.Tensor, double_quant: bool = False) -> dict[str, Any]:
    """Our NF4 against ``bitsandbytes.functional.quantize_4bit`` on CPU: codebook, packed codes, dequantized tensor.

    Defined for chapter 06, section "NF4 from scratch"."""
    from bitsandbytes import functional as bnb_f

    ours = Q.quantize_nf4(weight, Q.NF4_BLOCKSIZE, double_quant)
    packed, state = bnb_f.quantize_4bit(weight, blocksize=Q.NF4_BLOCKSIZE, quant_type="nf4",
                                        compress_statistics=double_quant)
    theirs = bnb_f.dequantize_4bit(packed, state)
    mine = Q.dequantize_nf4(ours)
    return {"codebook equal": bool(torch.equal(Q.nf4_codebook(), bnb_f.get_4bit_type("nf4", device="cpu"))),
            "codes equal": bool(torch.equal(ours.packed(), packed)),
            "dequantized max |diff|": float((mine - theirs).abs().max()),
            "ours relative error": Q.reconstruction_error(weight, mine)["relative"],
            "bitsandbytes relative error": Q.reconstruction_error(weight, theirs)["relative"],
            "bytes ours": ours.nbytes(),
            "bytes bitsandbytes": packed.numel() + state.absmax.numel() * state.absmax.element_size()
            + (state.state2.absmax.numel() * 4 + 4 if double_quant else 0)}


def reconstruction_table(weight: torch.Tensor) -> list[dict[str, Any]]:
    """Relative (Frobenius) and max errors and bytes per weight of each storage, against fp32.

    Defined for chapter 06, sections "NF4 from scratch" and "int8" (the closing note quotes it)."""
    rows = []
    for label, bits, dq in (("NF4, block 64", 4, False), ("NF4, block 64, double quant", 4, True)):
        error = Q.reconstruction_error(weight, Q.quantize_dequantize(weight, bits, 64, dq))
        rows.append({"storage": label, **error, "bytes/weight": Q.bytes_per_weight(bits, 64, dq)})
    for granularity in Q.GRANULARITIES:
        codes, absmax = Q.quantize_int8(weight, granularity)
        error = Q.reconstruction_error(weight, Q.dequantize_int8(codes, absmax, granularity))
        per = absmax.numel() * 4 / weight.numel()
        rows.append({"storage": f"int8 absmax per {granularity}", **error, "bytes/weight": 1 + per})
    return rows


def llm_int8_errors(weight: torch.Tensor, tokens: int = 64, outlier_scale: float = 20.0, seed: int = 0
                    ) -> dict[str, float]:
    """``x @ W.T`` errors of row-wise int8 with and without LLM.int8's decomposition, for inputs with 2 outlier
    features (magnitudes ~``outlier_scale``, like the emergent features of LLM.int8's section 4).

    Defined for chapter 06, section "int8"."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, weight.shape[1], generator=generator)
    x[:, :2] *= outlier_scale
    exact = x @ weight.T
    mixed, outliers = Q.int8_outlier_matmul(x, weight, Q.LLM_INT8_THRESHOLD)
    plain, _ = Q.int8_outlier_matmul(x, weight, float("inf"))
    return {"outlier features": int(outliers.numel()),
            "int8 relative error": Q.reconstruction_error(exact, plain)["relative"],
            "LLM.int8 relative error": Q.reconstruction_error(exact, mixed)["relative"]}


# --- QLoRA ------------------------------------------------------------------------------------------------

def peft_bitsandbytes_counts(model: str = "tiny-llama", **hp: Any) -> dict[str, int]:
    """QLoRA's parameter counts four ways on a real tiny model.

    ``formula`` and ``ours`` (our built model: one 4-bit index per element) count a 4-bit weight at its
    element count; peft's ``get_nb_trainable_parameters`` on a model whose linears are bitsandbytes
    ``Linear4bit`` says the same, because it multiplies a ``Params4bit``'s element count by 2; summing
    ``numel()`` over that model gives the packed count (two indices per uint8 element).

    Defined for chapter 06, section "QLoRA: counted three ways"."""
    import bitsandbytes as bnb
    import peft

    from survey_utils.counting import closed_form, count_parameters
    from survey_utils.methods import get_method
    from survey_utils.methods.common import replace_module
    from survey_utils.zoo import build_model

    method = get_method("qlora")
    formula = closed_form(model, method, **hp)
    ours = count_parameters(method.apply(build_model(model, device="cpu"), **method.resolve(
        build_model(model, device="meta").config, **hp)))
    built = build_model(model, device="cpu")
    resolved = method.resolve(built.config, **hp)
    for name, module in list(built.named_modules()):
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in
                                                       method.default_targets(built.config)["target_modules"]):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      quant_type="nf4", compress_statistics=resolved["bnb_4bit_use_double_quant"])
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                             blocksize=resolved["blocksize"])._quantize("cpu")
            replace_module(built, name, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(built, method.peft_config(built.config, **resolved))
    trainable, total = wrapped.get_nb_trainable_parameters()
    return {"formula trainable": formula.trainable, "formula total": formula.total,
            "ours trainable": ours.trainable, "ours total": ours.total,
            "peft+bnb trainable": trainable, "peft+bnb total": total,
            "peft+bnb sum of numel() (packed)": sum(p.numel() for p in wrapped.parameters())}


def train_tiny(method: str = "qlora", model: str = "tiny-llama", steps: int = 8, lr: float = 1e-2,
               seed: int = 0, **hp: Any) -> dict[str, Any]:
    """Train ``method`` on a tiny model for ``steps`` AdamW steps on one fixed random batch (memorising it).

    Returns the losses and whether the frozen 4-bit storage is byte-for-byte unchanged.
    Defined for chapter 06, section "QLoRA trains"."""
    from survey_utils.counting import apply_method
    from survey_utils.parity import example_inputs
    from survey_utils.zoo import build_model

    torch.manual_seed(seed)
    built = apply_method(build_model(model, device="cpu", seed=seed), method, **hp)
    frozen = {n: b.detach().clone() for n, b in built.named_parameters() if not b.requires_grad}
    inputs = example_inputs(built.config, batch=4, seq_len=32, seed=seed)
    trainable = [p for p in built.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    built.train()
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation on a shared machine
    try:
        for _ in range(steps):
            loss = built(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    unchanged = all(torch.equal(p, frozen[n]) for n, p in built.named_parameters() if not p.requires_grad)
    return {"losses": losses, "base unchanged": unchanged, "trainable": sum(p.numel() for p in trainable)}


# --- LoftQ ------------------------------------------------------------------------------------------------

def loftq_errors(weight: torch.Tensor, r: int = 16, lora_alpha: float = 16.0, iterations: int = 5,
                 double_quant: bool = False) -> list[dict[str, float]]:
    r"""``||W - (Q + s BA)||_F / ||W||_F`` after 1..``iterations`` LoftQ steps, against QLoRA's initialisation
    (B = 0, so the error is the quantization's). peft's ``loftq_init`` (peft 0.21.2) moves the weight to
    ``cuda`` (or ``xpu``) unconditionally, so it does not run on a CPU-only machine; it is not compared here.

    Defined for chapter 06, section "LoftQ"."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise SurveyError(f"loftq_iter={iterations!r} must be at least 1")
    from survey_utils.methods.layers.quantized import NF4Linear, loftq_init

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    plain = NF4Linear(linear, Q.NF4_BLOCKSIZE, double_quant)
    plain_error = Q.reconstruction_error(weight, plain.dequantized())["relative"]
    scaling = lora_alpha / r
    rows = []
    for t in range(1, iterations + 1):
        layer = copy.deepcopy(plain)
        a, b = loftq_init(layer, weight, r, scaling, t)
        ours = Q.reconstruction_error(weight, layer.dequantized() + scaling * (b @ a))["relative"]
        rows.append({"iterations": t, "QLoRA init (B=0)": plain_error, "LoftQ": ours,
                     "reduction": 1 - ours / plain_error})
    return rows


# --- the surveys' claims ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    key: str
    kind: str
    text: str
    value: float
    unit: str
    source: str
    verified: str


def read_claims(path: Path = CLAIMS_CSV) -> dict[str, Claim]:
    """``data/quantization_claims.csv``: the claims, the architectures and the settings, each with its source.

    Defined for chapter 06, section "What the surveys report, recomputed"."""
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    claims = {}
    for line, row in enumerate(rows, start=2):
        try:
            claims[row["key"]] = Claim(row["key"], row["kind"], row["text"], float(row["value"]), row["unit"],
                                       row["source"], row["verified"])
        except (KeyError, ValueError) as error:
            raise SurveyError(f"{path.name} line {line}: {error}") from None
    return claims


def claim_configs(claims: dict[str, Claim] | None = None) -> dict[str, Any]:
    """LLaMA-65B and GPT-3 175B configs built from the transcribed architecture rows (not in the zoo).

    Defined for chapter 06, section "What the surveys report, recomputed"."""
    from transformers import GPT2Config, LlamaConfig

    c = {k: int(v.value) for k, v in (claims or read_claims()).items() if v.kind == "architecture"}
    llama = LlamaConfig(hidden_size=c["llama65b_hidden_size"], intermediate_size=c["llama65b_intermediate_size"],
                        num_hidden_layers=c["llama65b_num_hidden_layers"],
                        num_attention_heads=c["llama65b_num_attention_heads"],
                        num_key_value_heads=c["llama65b_num_attention_heads"], vocab_size=c["llama65b_vocab_size"],
                        max_position_embeddings=c["llama65b_max_position_embeddings"], tie_word_embeddings=False,
                        architectures=["LlamaForCausalLM"])
    llama.name_or_path = "llama-65b"
    gpt3 = GPT2Config(n_embd=c["gpt3_n_embd"], n_head=c["gpt3_n_head"], n_layer=c["gpt3_n_layer"],
                      n_positions=c["gpt3_n_positions"], vocab_size=c["gpt3_vocab_size"],
                      architectures=["GPT2LMHeadModel"])
    gpt3.name_or_path = "gpt-3-175b"
    return {"llama-65b": llama, "gpt-3-175b": gpt3}


def claims_table(batch_size: int = 1, seq_len: int = 512) -> list[dict[str, Any]]:
    """Each claim beside our memory model's estimate, with the settings, and by how much they differ.

    Settings not given by the source are ours and stated (batch ``batch_size``, ``seq_len`` tokens, gradient
    checkpointing for the QLoRA rows, as QLoRA's runs use it). Allocated bytes only (no CUDA context).
    Defined for chapter 06, section "What the surveys report, recomputed"."""
    from survey_utils.architecture import total_params
    from survey_utils.memory import estimate
    from survey_utils.zoo import load_config

    claims = read_claims()
    configs = claim_configs(claims)
    llama, gpt3 = configs["llama-65b"], configs["gpt-3-175b"]
    qlora_hp = {"r": int(claims["qlora_lora_r"].value), "lora_alpha": claims["qlora_lora_alpha"].value,
                "bnb_4bit_use_double_quant": True}
    common = {"batch_size": batch_size, "seq_len": seq_len}
    rows = []

    def add(key: str, est: Any, settings: str, params: int | None = None) -> None:
        claim = claims[key]
        unit = {"GB": 1e9, "TB": 1e12}.get(claim.unit)
        ours = est.total / unit if unit else est
        if unit and params:  # the same figures per parameter: where the difference comes from
            settings += (f"; per parameter: claim {claim.value * unit / params:.1f} B, "
                         f"ours {est.total / params:.1f} B")
        rows.append({"claim": claim.text, "source": claim.source, "claimed": claim.value, "unit": claim.unit,
                     "ours": round(float(ours), 2), "ratio": round(float(ours) / claim.value, 2),
                     "settings": settings, "verified": claim.verified})

    q65 = estimate(llama, "qlora", hp=qlora_hp, quantization="nf4", gradient_checkpointing=True, **common)
    qsettings = (f"LLaMA-65B, NF4 + double quant, LoRA r={qlora_hp['r']} alpha={qlora_hp['lora_alpha']:g} on all "
                 f"linear layers, bf16, AdamW (paged: same bytes), checkpointing, batch {batch_size} x {seq_len}")
    add("qlora_65b_single_gpu", q65, qsettings)
    full65 = estimate(llama, "full", dtype="fp16", optimizer="adamw", **common)
    add("qlora_780gb_full", full65, f"LLaMA-65B, full fine-tuning, fp16 + fp32 master and Adam states, batch "
        f"{batch_size} x {seq_len}", total_params(llama))
    add("qlora_780gb_qlora", q65, qsettings)
    full175 = estimate(gpt3, "full", dtype="fp16", optimizer="adamw", **common)
    add("lora_gpt3_full", full175, f"GPT-3 175B, full fine-tuning, fp16 + fp32 master and Adam states, batch "
        f"{batch_size} x {seq_len}", total_params(gpt3))
    lora175 = estimate(gpt3, "lora", hp={"r": int(claims["lora_gpt3_r"].value), "target_modules": ["c_attn"]},
                       dtype="fp16", optimizer="adamw", **common)
    add("lora_gpt3_lora", lora175, f"GPT-3 175B, LoRA r=4 on the fused q/k/v projection (same count as Wq and "
        f"Wv), fp16, batch {batch_size} x {seq_len}")
    for key, dtype in (("lialin_rule_low", "fp32"), ("lialin_rule_high", "fp16")):
        est = estimate("llama-2-7b", "full", dtype=dtype, optimizer="adamw", **common)
        params = total_params(load_config("llama-2-7b"))
        weights = params * {"fp32": 4, "fp16": 2}[dtype]
        add(key, est.total / weights, f"LLaMA-2-7B, full fine-tuning, AdamW, {dtype}, batch {batch_size} x "
            f"{seq_len}: total / weights ({est.total / params:.1f} B per parameter)")
    return rows


def format_claims(rows: list[dict[str, Any]]) -> str:
    """The claims table as fixed-width text (the chapter prints it).

    Defined for chapter 06, section "What the surveys report, recomputed"."""
    lines = [f"{'claim':<62}{'claimed':>10}{'ours':>10}{'ours/claim':>11}  settings"]
    for r in rows:
        lines.append(f"{r['claim'][:61]:<62}{r['claimed']:>7g} {r['unit']:<2}{r['ours']:>10g}{r['ratio']:>11g}  "
                     f"{r['settings']}")
    return "\n".join(lines)


# --- 8-bit optimizer states -------------------------------------------------------------------------------

def adamw8bit_state_bytes(model: str = "tiny-llama", method: str = "qlora", dtype: str = "fp32",
                          **hp: Any) -> dict[str, Any]:
    """bitsandbytes' ``AdamW8bit`` state tensors after one step on CPU, against the memory model's estimate
    (:func:`survey_utils.memory.closed_form.adamw8bit_state_bytes`) and against treating the trainable
    parameters as one tensor (what the estimate did before it read the tensors' sizes).

    Each storage is counted once: the quantization maps are one pair shared by every 8-bit tensor.
    Defined for chapter 06, section "8-bit and paged optimizers"."""
    import bitsandbytes as bnb

    from survey_utils.counting import apply_method
    from survey_utils.memory import estimate
    from survey_utils.memory.closed_form import BNB_MIN_8BIT_SIZE
    from survey_utils.memory.closed_form import adamw8bit_state_bytes as rule
    from survey_utils.parity import example_inputs
    from survey_utils.units import torch_dtype
    from survey_utils.zoo import build_model

    built = apply_method(build_model(model, device="cpu", dtype=torch_dtype(dtype)), method, **hp)
    params = [p for p in built.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    inputs = example_inputs(built.config, batch=1, seq_len=8)
    built(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for state in optimizer.state.values()
                for t in state.values() if isinstance(t, torch.Tensor)}
    n = sum(p.numel() for p in params)
    est = estimate(model, method, hp=hp, optimizer="adamw8bit", dtype=dtype)
    return {"bitsandbytes state bytes": sum(storages.values()), "memory model estimate": est.optimizer_states,
            "per-tensor rule": rule([p.numel() for p in params]), "one-tensor rule": rule([n]),
            "trainable tensors": len(params),
            "tensors under min_8bit_size": sum(p.numel() < BNB_MIN_8BIT_SIZE for p in params),
            "trainable params": n}


# --- reserved memory, sharding, the advisor ---------------------------------------------------------------

def reserved_demo(model: str = "tiny-llama", method: str = "lora", batch_size: int = 1, seq_len: int = 128
                  ) -> dict[str, int]:
    """One step's allocated and reserved peaks: the closed form (CPU kernels, like the simulation), and the
    simulated step's allocation trace replayed through the caching-allocator model (with and without
    ``expandable_segments``).

    Defined for chapter 06, section "Reserved, not allocated"."""
    from survey_utils.memory import estimate
    from survey_utils.memory.simulation import simulate

    est = estimate(model, method, batch_size=batch_size, seq_len=seq_len, device="cpu")
    sim = simulate(model, method, batch_size=batch_size, seq_len=seq_len)
    return {"estimate: allocated": est.total, "estimate: reserved (closed form)": int(est.reserved or 0),
            "simulation: allocated": sim.peak, "replay: allocated (512 B blocks)": int(sim.allocated_rounded or 0),
            "replay: reserved": int(sim.reserved or 0),
            "replay: reserved, expandable segments": int(sim.reserved_expandable or 0)}


def sharding_table(model: str = "llama-3-70b", method: str = "full", gpus: int = 8, batch_size: int = 1,
                   seq_len: int = 2048, gradient_checkpointing: bool = True) -> list[dict[str, Any]]:
    """Per-GPU memory of one step under every sharding the advisor tries on ``gpus`` GPUs (DDP, ZeRO-1/2/3, FSDP,
    CPU offload), from the ZeRO paper's accounting and FSDP's unit-wise all-gather peak
    (:func:`survey_utils.memory.sharding.per_gpu`), with the allocator's reserve and the CUDA context.

    Defined for chapter 06, section "More than one GPU"."""
    from survey_utils.advisor import point
    from survey_utils.memory import estimate
    from survey_utils.memory.sharding import candidates
    from survey_utils.methods import get_method
    from survey_utils.zoo import load_config

    m = get_method(method)
    config = load_config(model)
    est = estimate(config, m, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                   quantization=m.base_quantization)
    rows = []
    for sharding in candidates(gpus):
        p = point(config, m, est, sharding, gradient_checkpointing)
        rows.append({"sharding": sharding.label, "weights": p.terms.get("weights", 0),
                     "gradients": p.terms.get("gradients", 0), "optimizer states": p.terms.get("optimizer states", 0),
                     "allocated": p.allocated, "reserved": p.reserved, "device total": p.device_total})
    return rows


def format_sharding(rows: list[dict[str, Any]], capacity: int | None = None) -> str:
    """The sharding table as fixed-width text (GiB), with a fits column when ``capacity`` (bytes per GPU) is given.

    Defined for chapter 06, section "More than one GPU"."""
    keys = ["weights", "gradients", "optimizer states", "allocated", "reserved", "device total"]
    head = f"{'sharding':<46}" + "".join(f"{k:>17}" for k in keys) + ("   fits" if capacity else "")
    lines = [head]
    for r in rows:
        line = f"{r['sharding']:<46}" + "".join(f"{r[k] / 2**30:>13.1f} GiB" for k in keys)
        if capacity:
            line += f"   {'yes' if r['device total'] <= capacity else 'no'}"
        lines.append(line)
    return "\n".join(lines)
