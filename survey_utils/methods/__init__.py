"""PEFT methods, one file per family of the surveys' taxonomy; each method joins ``registry`` once.

- ``baseline``: full fine-tuning, the reference point (chapter 00);
- ``adapters`` (01), ``soft_prompts`` (02), ``selective`` (03), ``reparameterized`` (04), ``hybrid``
  (05, compositions of registered parts), ``quantized`` (06), ``multi_task`` (08).

Importing this package imports every family file, which registers its methods, and nothing heavier: the
nn.Module layers live in ``layers/`` and are imported inside ``apply``, so the registry and every closed form
load without torch, transformers or peft (``tests/methods/test_registry.py`` checks it).
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
