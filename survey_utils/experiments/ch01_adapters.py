"""Chapter 01's experiments: adapters against a reference method at an equal parameter budget.

Each helper names the section of ``notebooks/01_additive_adapters.py`` that shows it.
"""

from __future__ import annotations

from typing import Any

from survey_utils.methods.registry import Method, get_method


def rank_for_budget(config: Any, budget: int, reference: str | Method, rank_name: str = "r",
                    **settings: Any) -> int:
    """The rank (hyper-parameter ``rank_name``) of ``reference`` whose trainable count on the same model is
    closest to ``budget``; ``settings`` fix its other hyper-parameters (its defaults otherwise).

    Defined for chapter 01, section "Adapters and LoRA at an equal budget" (the equal-budget explorer).
    """
    reference = get_method(reference) if isinstance(reference, str) else reference
    per_rank = reference.count(config, **{rank_name: 1}, **settings)
    return max(1, round(budget / per_rank))
