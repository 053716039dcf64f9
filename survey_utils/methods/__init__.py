"""PEFT methods, one file per family of the surveys' taxonomy; each method joins ``registry`` once.

- ``baseline``: full fine-tuning, the reference point.
- ``reparameterized``: LoRA and its family (chapter 04).

Importing this package imports every family file, which registers its methods.
"""

from survey_utils.methods import (  # noqa: F401  (registration side effects)
    adapters,
    baseline,
    hybrid,
    multi_task,
    quantized,
    reparameterized,
    selective,
    soft_prompts,
)
from survey_utils.methods.common import freeze, merge, unmerge
from survey_utils.methods.registry import HyperParam, Method, Taxonomy, get_method, list_methods, register

__all__ = [
    "HyperParam", "Method", "Taxonomy", "freeze", "get_method", "list_methods", "merge", "register", "unmerge",
]
