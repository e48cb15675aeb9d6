"""The exit policy on tiny hand-made tensors, without any model."""

from __future__ import annotations

import torch

from dtop_cli.model import exits as X


def _scores_from_best(best: torch.Tensor, cls: torch.Tensor, K: int) -> torch.Tensor:
    """Scores (B, K, L) whose max over classes is `best` at class `cls`."""
    B, L = best.shape
    s = torch.full((B, K, L), 0.01)
    s.scatter_(1, cls[:, None], best[:, None])
    return s


def test_token_scores_is_presence_times_sigmoid():
    presence = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # (1, 2, 2)
    masks = torch.tensor([[[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]]])
    got = X.token_scores(presence, masks)
    p = presence.softmax(-1)[..., 0]
    want = p[..., None] * masks.sigmoid()
    assert torch.allclose(got, want)
    assert got.shape == (1, 2, 3)


def test_confident_ignores_padding():
    best = torch.tensor([[0.95, 0.99, 0.5]])
    cls = torch.tensor([[0, 1, 0]])
    s = _scores_from_best(best, cls, 3)
    valid = torch.tensor([[True, False, True]])
    retiring, b, c = X.confident(s, 0.9, valid)
    assert retiring.tolist() == [[True, False, False]]
    assert c.tolist() == [[0, 1, 0]]


def test_keep_topk_exact_counts_per_class_and_image():
    torch.manual_seed(0)
    B, K, L, k = 3, 4, 40, 5
    cls = torch.randint(0, K, (B, L))
    best = torch.rand(B, L) * 0.5 + 0.5
    retiring = best > 0.6
    keep = X.keep_topk_per_class(best, cls, retiring, K, k)
    for b in range(B):
        for c in range(K):
            members = (cls[b] == c) & retiring[b]
            n = int(members.sum())
            kept = keep[b] & members
            assert int(kept.sum()) == min(k, n), (b, c)
            if n:
                # the kept ones are the most confident of the class
                top = best[b][members].sort(descending=True).values[: min(k, n)]
                assert torch.allclose(best[b][kept].sort(descending=True).values, top)
        assert not (keep[b] & ~retiring[b]).any()


def test_keep_topk_small_class_keeps_all_and_zero_k_keeps_none():
    best = torch.tensor([[0.99, 0.98, 0.97, 0.96]])
    cls = torch.tensor([[0, 0, 1, 0]])
    retiring = torch.ones(1, 4, dtype=torch.bool)
    keep = X.keep_topk_per_class(best, cls, retiring, 2, 2)
    assert keep.tolist() == [[True, True, True, False]]
    assert not X.keep_topk_per_class(best, cls, retiring, 2, 0).any()


def test_exit_decision_combines_threshold_and_keep():
    best = torch.tensor([[0.99, 0.98, 0.97, 0.5, 0.96, 0.95]])
    cls = torch.tensor([[0, 0, 0, 1, 2, 2]])
    s = _scores_from_best(best, cls, 3)
    leaving = X.exit_decision(s, 0.9, 1)
    # class 0: keeps 0.99, drops 0.98 and 0.97; class 2: keeps 0.96, drops 0.95; token 3 not confident
    assert leaving.tolist() == [[False, True, True, False, False, True]]


def _plan(active):
    """The eager path's plan for the given staying tokens (everything else leaves)."""
    plan = X.exit_plan(~active)
    return plan.idx, (plan.valid if plan.valid is not None else torch.ones_like(plan.idx, dtype=torch.bool))


def test_compact_plan_packs_active_tokens_in_order():
    active = torch.tensor([[True, False, True, True], [False, True, False, False]])
    idx, valid = _plan(active)
    assert idx.shape == (2, 3)
    assert idx[0].tolist() == [0, 2, 3]
    assert idx[1, 0].item() == 1
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    # padding slots point at distinct inactive tokens
    assert len(set(idx[1].tolist())) == 3 and not active[1, idx[1, 1:]].any()


def test_gather_then_scatter_roundtrip_and_no_leak_from_padding():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    active = torch.tensor([[True, True, False, True, False], [False, False, True, False, False]])
    idx, valid = _plan(active)
    g = X.gather_tokens(x, idx)
    assert torch.equal(g[0], x[0, [0, 1, 3]])
    assert torch.equal(g[1, 0], x[1, 2])
    full = torch.zeros(2, 5, 3)
    poisoned = torch.where(valid[..., None], g, torch.full_like(g, 1e6))  # padding holds junk
    back = X.scatter_tokens(full, poisoned, idx, valid, dim=1)
    assert torch.equal(back[active], x[active])
    assert torch.equal(back[~active], torch.zeros_like(back[~active]))


def test_scatter_tokens_keeps_gradient_to_values():
    full = torch.zeros(1, 2, 4)
    vals = torch.ones(1, 2, 2, requires_grad=True)
    pos = torch.tensor([[1, 3]])
    valid = torch.tensor([[True, False]])
    out = X.scatter_tokens(full, vals, pos, valid, dim=-1)
    out.sum().backward()
    assert vals.grad.tolist() == [[[1.0, 0.0], [1.0, 0.0]]]
    assert out[0, :, 1].tolist() == [1.0, 1.0] and out[0, :, 3].tolist() == [0.0, 0.0]


def test_compaction_keeps_one_token_per_image_without_a_host_read():
    leaving = torch.tensor([[True, True, True], [False, True, False]])
    c = X.compact(leaving)
    # image 0 would lose every token: its slot 0 stays
    assert c.leaving.tolist() == [[False, True, True], [False, True, False]]
    assert c.counts.tolist() == [1, 2]
    assert c.order[0, 0].item() == 0 and c.order[1, :2].tolist() == [0, 2]
    assert c.stats().tolist() == [2, 1, 3]
    plan = X.exit_plan(leaving)
    assert torch.equal(plan.leaving, c.leaving) and torch.equal(plan.idx, c.order[:, :2])
    assert plan.valid.tolist() == [[True, False], [True, True]]


def test_exit_plan_is_none_when_nothing_leaves():
    assert X.exit_plan(torch.zeros(2, 4, dtype=torch.bool)) is None
    valid = torch.tensor([[True, True, False]])
    assert X.exit_plan(torch.zeros(1, 3, dtype=torch.bool), valid) is None


def test_mark_exits_by_slot_and_by_position():
    stage = torch.full((1, 4), 3)
    X.mark_exits(stage, torch.tensor([[True, False, False, True]]), None, 1)
    assert stage.tolist() == [[1, 3, 3, 1]]
    X.mark_exits(stage, torch.tensor([[False, True]]), torch.tensor([[1, 2]]), 2)
    assert stage.tolist() == [[1, 3, 2, 1]]
