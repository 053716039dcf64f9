"""Shape arithmetic that the closed forms and the layers share, torch-free (chapter 04).

The closed-form counts in ``reparameterized.py`` and the layers in ``layers/lowrank.py`` both need the
LyCORIS factorisation rule; keeping it here, below both, gives them one rule and keeps counting free of
torch.
"""

from __future__ import annotations


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension`` (LyCORIS' rule, as in peft's LoKr).

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)``; otherwise the pair of
    divisors closest to the square root with ``m <= factor`` (``-1``: no limit), smaller one first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr_shapes(d_in: int, d_out: int, r: int, decompose_both: bool, decompose_factor: int
                ) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """LoKr's factor shapes ``W1: (a, c)``, ``W2: (b, d)`` with ``a b = d_out``, ``c d = d_in``, and whether
    each factor is stored full (``True``) or as a rank-r product (peft's rule: low rank only where
    ``r < max(side) / 2``, and for W1 only with ``decompose_both``)."""
    out_l, out_k = factorization(d_out, decompose_factor)
    in_m, in_n = factorization(d_in, decompose_factor)
    full_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
    full_w2 = not (r < max(out_k, in_n) / 2)
    return (out_l, in_m), (out_k, in_n), full_w1, full_w2


def lokr_numel(d_in: int, d_out: int, r: int, decompose_both: bool, decompose_factor: int) -> int:
    (a, c), (b, d), full_w1, full_w2 = lokr_shapes(d_in, d_out, r, decompose_both, decompose_factor)
    return (a * c if full_w1 else r * (a + c)) + (b * d if full_w2 else r * (b + d))
