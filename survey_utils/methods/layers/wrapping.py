"""What every layer that wraps a base layer shows as its own: the base layer's ``weight`` (and ``bias``).

transformers reads ``module.weight`` of modules it finds by name (T5 checks ``wo.weight.dtype`` before its
feed-forward output; tied embeddings look for the head's weight), and peft's layers expose both the same way, so
a wrapped layer keeps answering for them.
"""

from __future__ import annotations

import torch
from torch import nn


class ShowsBaseWeight(nn.Module):
    """A wrapper of ``self.base_layer`` whose ``weight`` is the base layer's."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight


class ShowsBaseWeightAndBias(ShowsBaseWeight):
    """A wrapper of ``self.base_layer`` whose ``weight`` and ``bias`` are the base layer's."""

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias
