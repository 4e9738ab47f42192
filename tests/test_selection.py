import pytest
import torch

from fishdip_peft.selection import global_topk_indices


def brute_force(scores, k):
    flat = torch.cat([s.reshape(-1) for s in scores])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    chosen, offset, result = set(order), 0, []
    for s in scores:
        result.append(torch.tensor(sorted(i - offset for i in chosen if offset <= i < offset + s.numel()), dtype=torch.int64))
        offset += s.numel()
    return result


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, 6, shape, generator=g).float() * 0.25 for shape in [(7, 5), (13,), (3, 4, 2), (1,)]]
    for k in [1, 5, 17, 40, sum(s.numel() for s in scores)]:
        got = global_topk_indices(scores, k)
        assert sum(t.numel() for t in got) == k
        for a, b in zip(got, brute_force(scores, k)):
            assert torch.equal(a, b)


def test_continuous_scores_of_very_different_magnitudes():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(50, generator=g) * 10.0 ** e for e in (-30, -3, 0, 20)]
    for a, b in zip(global_topk_indices(scores, 33), brute_force(scores, 33)):
        assert torch.equal(a, b)


def test_all_zero_scores_take_the_lowest_positions():
    got = global_topk_indices([torch.zeros(3), torch.zeros(4)], 5)
    assert [t.tolist() for t in got] == [[0, 1, 2], [0, 1]]


@pytest.mark.parametrize("k", [0, 8])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be in"):
        global_topk_indices([torch.ones(3), torch.ones(4)], k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_rejects_invalid_scores(bad):
    with pytest.raises(ValueError, match="finite and non-negative"):
        global_topk_indices([torch.tensor([1.0, bad])], 1)
