"""The decode loop's sampler: inverse-CDF draws, the nucleus cut, and the draws' frequencies."""

from __future__ import annotations

import math

import pytest
import torch

from rlaif.backends.kvcache import inverse_cdf, nucleus, select_next


def test_inverse_cdf_golden() -> None:
    # cumulative sums 0.1, 0.1, 0.7, 1.0: [0, 0.1) -> 0, [0.1, 0.7) -> 2, [0.7, 1) -> 3; index 1
    # has no mass and is never drawn, not even at its edge
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 7)
    u = torch.tensor([0.0, 0.05, 0.1, 0.69, 0.7, 0.999999, 1.0], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3, 3, 3]
    # u * total rounding up to the total falls on the last token with mass, not past the end
    tail = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert inverse_cdf(tail, torch.tensor([1.0], dtype=torch.float64)).tolist() == [1]
    # rows need not be normalised: [2, 6] is [0.25, 0.75]
    unnormalised = torch.tensor([[2.0, 6.0]] * 2)
    assert inverse_cdf(unnormalised, torch.tensor([0.24, 0.26])).tolist() == [0, 1]


def _sorted_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The textbook nucleus: sort the whole row."""
    p, order = probs.sort(dim=-1, descending=True)
    p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, p)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("first_k", [1, 4, 256])
def test_nucleus_equals_the_full_sort(top_p: float, first_k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    # peaked and flat rows, so that some need k to grow past first_k and some do not
    logits = torch.randn(6, 1000, generator=gen) * torch.tensor([[0.3], [1], [3], [6], [10], [1]])
    probs = torch.softmax(logits, -1)
    got = nucleus(probs, top_p, first_k=first_k)
    torch.testing.assert_close(got, _sorted_nucleus(probs, top_p), rtol=0, atol=0)
    assert bool((got.sum(-1) > min(top_p, 1 - 1e-6) - 1e-6).all())


def test_draws_follow_the_distribution_and_never_leave_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 20_000
    gens = [torch.Generator().manual_seed(7)]
    counts = torch.zeros(4)
    for _ in range(n):
        counts[select_next(logits, 1.0, 1.0, gens, [0])] += 1
    for c, p in zip(counts.tolist(), [0.5, 0.3, 0.15, 0.05], strict=True):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n), counts
    # top_p 0.7: the nucleus is {0, 1} (0.5 before token 1 is under 0.7, 0.8 before token 2 is
    # over), renormalised to 0.625 / 0.375
    counts.zero_()
    for _ in range(n):
        counts[select_next(logits, 1.0, 0.7, gens, [0])] += 1
    assert counts[2:].sum() == 0
    assert abs(counts[0] / n - 0.625) < 4 * math.sqrt(0.625 * 0.375 / n), counts


def test_a_row_draws_the_same_alone_or_in_a_batch() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]

    g = gens()
    together = [select_next(logits, 0.8, 0.9, g, [0, 1, 2]) for _ in range(5)]
    g = gens()
    alone = [select_next(logits[1:2], 0.8, 0.9, g, [1]) for _ in range(5)]
    assert [int(t[1]) for t in together] == [int(t[0]) for t in alone]


def test_rows_without_mass_or_with_nan_are_refused() -> None:
    u = torch.tensor([0.5], dtype=torch.float64)
    for bad in ([0.0, 0.0, 0.0], [0.5, float("nan"), 0.5], [0.5, float("inf"), 0.0]):
        with pytest.raises(ValueError, match="no mass, or NaN or inf"):
            inverse_cdf(torch.tensor([bad]), u)
    gens = [torch.Generator().manual_seed(0)]
    with pytest.raises(ValueError):
        select_next(torch.tensor([[0.0, float("nan")]]), 1.0, 1.0, gens, [0])


def test_nucleus_with_a_first_k_of_zero_still_grows() -> None:
    probs = torch.softmax(torch.randn(2, 30, generator=torch.Generator().manual_seed(3)), -1)
    torch.testing.assert_close(nucleus(probs, 0.8, first_k=0), _sorted_nucleus(probs, 0.8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_with_cuda_generators() -> None:
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1)).cuda()
    gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(3)]
    out = select_next(logits, 0.7, 0.9, gens, [0, 1, 2])
    assert out.device.type == "cuda" and out.shape == (3,)
    assert bool((out >= 0).all()) and bool((out < 1000).all())
