"""Chapter 02's experiments: what soft prompts cost in positions, and peft's own defaults.

Each helper names the section of ``notebooks/02_additive_soft_prompts.py`` that shows it.
"""

from __future__ import annotations

import dataclasses
import warnings

from survey_utils.architecture import layout
from survey_utils.methods.registry import Method, get_method
from survey_utils.methods.soft_prompts import check_context, kv_width, prefix_layers
from survey_utils.zoo import load_config


def sequence_costs(config, method: str | Method, num_virtual_tokens: int, seq_len: int,
                   batch_size: int = 1, bytes_per_value: int = 2) -> dict[str, int]:
    """Positions and key/value-cache bytes of one forward with ``num_virtual_tokens`` of this method.

    ``query positions``: rows each block computes (prompt methods: n + L; prefix methods, whose positions
    are keys and values only: L); ``key positions``: what each prefixed/prompted attention layer attends
    over (n + L); ``kv cache bytes``: keys and values of every attention layer that sees the prompt, at
    ``bytes_per_value``.

    Defined for chapter 02, section "What the prompt costs" (the prompt-length explorer).
    """
    method = get_method(method) if isinstance(method, str) else method
    shape = layout(config)
    n = num_virtual_tokens
    check_context(config, n, seq_len)
    prompt = not method.key_value_positions
    layers = shape.num_layers if prompt else prefix_layers(config)
    if prompt and shape.is_encoder_decoder:  # the prompt lengthens the encoder only
        layers = shape.num_layers - prefix_layers(config)
    keys = seq_len + n
    return {"query positions": keys if prompt else seq_len, "key positions": keys,
            "kv cache bytes": 2 * layers * batch_size * keys * kv_width(config) * bytes_per_value}


def peft_config_at_its_defaults(model: str, method: str | Method):
    """peft's configuration of ``method`` with every hyper-parameter we share reset to *peft's* default
    (structural fields such as the task type and widths stay as our builder sets them). Comparing its
    count with our closed form at our defaults checks that our defaults are peft's.

    Defined for chapter 02, section "Checked against peft" (and used by the defaults test of every method).
    """
    method = get_method(method) if isinstance(method, str) else method
    config = load_config(model)
    explicit = method.peft_config(config, **method.resolve(config))
    ours = {hp.name for hp in method.hyperparams}
    theirs = {f.name: f.default for f in dataclasses.fields(explicit)
              if f.name in ours and f.default is not dataclasses.MISSING and f.default is not None}
    theirs.update({k: v for k, v in method.peft_variant.items() if k in ours})
    return dataclasses.replace(explicit, **theirs)


def peft_trainable_at_defaults(model: str, method: str | Method) -> int:
    """peft's trainable count of :func:`peft_config_at_its_defaults` on ``model`` built on ``meta``.

    Defined for chapter 02, section "Checked against peft".
    """
    import peft
    import torch

    from survey_utils.zoo import build_model

    built = build_model(model, device="meta")
    with warnings.catch_warnings(), torch.device("meta"):  # peft's prompt encoders built on meta: no memory
        warnings.simplefilter("ignore")
        return peft.get_peft_model(built, peft_config_at_its_defaults(model, method)).get_nb_trainable_parameters()[0]
