"""The ATM loss against a plain re-statement of the public code's semantics.

The reference below is written per image and per present class with ordinary loops, the way
one reads the public SegViT/DToP loss: targets ``label == class`` over the whole map, focal
averaged over all pixels, dice summed over all pixels, each mask term divided by the number
of present (image, class) pairs (all-reduced over processes / world size, at least 1). The
``excluded`` setting restricts both terms to labelled pixels instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dtop_cli.model.loss import ATMLoss

IGNORE = 255


def _reference(presence, masks, labels, *, ignored: str, num_masks: float | None = None,
               alpha=0.25, gamma=2.0, absent_weight=0.1, focal_w=20.0, dice_w=1.0) -> dict[str, float]:
    B, K = presence.shape[:2]
    H, W = labels.shape[-2:]
    # presence: weighted mean cross-entropy over every (image, class) query
    num = den = 0.0
    pairs = []
    for b in range(B):
        labelled = set(int(v) for v in labels[b].unique() if int(v) != IGNORE)
        for k in range(K):
            target = 0 if k in labelled else 1
            w = 1.0 if target == 0 else absent_weight
            logp = torch.log_softmax(presence[b, k].double(), -1)[target].item()
            num += -w * logp
            den += w
            if k in labelled:
                pairs.append((b, k))
    loss_cls = num / den
    n = num_masks if num_masks is not None else max(len(pairs), 1)
    focal_sum = dice_sum = 0.0
    for b, k in pairs:
        logit = F.interpolate(masks[b, k][None, None].double(), size=(H, W), mode="bilinear",
                              align_corners=False)[0, 0]
        focal_px, p_sum, t_sum, pt_sum, count = 0.0, 0.0, 0.0, 0.0, 0
        for i in range(H):
            for j in range(W):
                lab = int(labels[b, i, j])
                if ignored == "excluded" and lab == IGNORE:
                    continue
                t = 1.0 if lab == k else 0.0
                z = float(logit[i, j])
                p = 1.0 / (1.0 + math.exp(-z))
                ce = max(z, 0.0) - z * t + math.log1p(math.exp(-abs(z)))
                p_t = p * t + (1 - p) * (1 - t)
                a_t = alpha * t + (1 - alpha) * (1 - t)
                focal_px += a_t * ce * (1 - p_t) ** gamma
                p_sum += p
                t_sum += t
                pt_sum += p * t
                count += 1
        focal_sum += focal_px / max(count, 1)
        dice_sum += 1 - (2 * pt_sum + 1) / (p_sum + t_sum + 1)
    return {"loss_cls": loss_cls, "loss_mask": focal_w * focal_sum / n, "loss_dice": dice_w * dice_sum / n}


def _random_case(seed: int, B=3, K=12, h=4, w=5, H=16, W=20, ignored_share=1 / 6):
    g = torch.Generator().manual_seed(seed)
    presence = torch.randn(B, K, 2, generator=g)
    masks = 2 * torch.randn(B, K, h, w, generator=g)
    labels = torch.randint(0, K, (B, H, W), generator=g)
    # only a few classes per image, so "absent" queries exist
    for b in range(B):
        keep = torch.randperm(K, generator=g)[: 3 + b]
        labels[b] = keep[torch.randint(0, len(keep), (H, W), generator=g)]
    labels[torch.rand(B, H, W, generator=g) < ignored_share] = IGNORE
    return presence, masks, labels


@pytest.mark.parametrize("ignored", ["negative", "excluded"])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_equals_the_plain_reference(ignored: str, seed: int) -> None:
    presence, masks, labels = _random_case(seed)
    assert (labels == IGNORE).float().mean() > 0.1
    got = ATMLoss(num_classes=12, ignored_pixels=ignored)(presence, masks, labels)
    want = _reference(presence, masks, labels, ignored=ignored)
    for k, v in want.items():
        assert abs(float(got[k]) - v) < 1e-5, (k, float(got[k]), v)


def test_the_two_settings_differ_only_where_pixels_are_ignored() -> None:
    presence, masks, labels = _random_case(3)
    neg = ATMLoss(num_classes=12, ignored_pixels="negative")(presence, masks, labels)
    exc = ATMLoss(num_classes=12, ignored_pixels="excluded")(presence, masks, labels)
    assert abs(float(neg["loss_mask"]) - float(exc["loss_mask"])) > 1e-3
    assert abs(float(neg["loss_dice"]) - float(exc["loss_dice"])) > 1e-3
    assert float(neg["loss_cls"]) == float(exc["loss_cls"])
    labels = labels.clone()
    labels[labels == IGNORE] = 0
    neg = ATMLoss(num_classes=12, ignored_pixels="negative")(presence, masks, labels)
    exc = ATMLoss(num_classes=12, ignored_pixels="excluded")(presence, masks, labels)
    for k in neg:
        assert abs(float(neg[k]) - float(exc[k])) < 1e-6


def test_gradients_reach_the_mask_logits_of_ignored_pixels_only_when_negative() -> None:
    presence, masks, labels = _random_case(4, B=1, K=3, h=2, w=2, H=2, W=2, ignored_share=0.0)
    labels[0, 0, 0] = IGNORE
    labels[0, 1, 1] = IGNORE
    for ignored, expect in (("negative", True), ("excluded", False)):
        m = masks.clone().requires_grad_(True)
        out = ATMLoss(num_classes=3, ignored_pixels=ignored)(presence, m, labels)
        (out["loss_mask"] + out["loss_dice"]).backward()
        # the 2x2 masks map 1:1 onto the 2x2 label map: pixel (0, 0) is ignored
        touched = bool(m.grad[0, :, 0, 0].abs().sum() > 0)
        assert touched is expect, ignored


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="ignored_pixels"):
        ATMLoss(num_classes=3, ignored_pixels="sometimes")


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # rank 0 sees one image with 2 classes, rank 1 three images with more classes
        presence, masks, labels = _random_case(10 + rank, B=1 + 2 * rank)
        if rank == 0:  # keep two of its classes
            keep = labels[labels != IGNORE].unique()[:2]
            labels[~torch.isin(labels, keep)] = IGNORE
        got = ATMLoss(num_classes=12)(presence, masks, labels)
        local = sum(len(set(labels[b].unique().tolist()) - {IGNORE}) for b in range(labels.shape[0]))
        torch.save({"got": {k: float(v) for k, v in got.items()}, "local": local,
                    "case": (presence, masks, labels)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_mask_count_is_all_reduced_over_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    counts = [r["local"] for r in res]
    assert counts[0] != counts[1]  # the ranks saw different numbers of classes
    n = max(sum(counts) / world, 1.0)
    for r in res:
        presence, masks, labels = r["case"]
        want = _reference(presence, masks, labels, ignored="negative", num_masks=n)
        local = _reference(presence, masks, labels, ignored="negative")
        for k, v in want.items():
            assert abs(r["got"][k] - v) < 1e-5, (k, r["got"][k], v)
        # and it is not the local normalisation
        assert abs(r["got"]["loss_mask"] - local["loss_mask"]) > 1e-4


# --------------------------------------------------------------------------- the fast forms


@pytest.mark.parametrize("pixels", [False, True])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_fused_focal_dice_equals_the_autograd_form(pixels: bool, gamma: float) -> None:
    """Values and gradients of the one-pass mask terms equal the plain autograd formulas."""
    from dtop_cli.model.loss import dice_loss, focal_dice, sigmoid_focal_loss

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 400, generator=g, dtype=torch.double) * 4).requires_grad_()
    t = (torch.rand(6, 400, generator=g) > 0.7).double()
    pix = (torch.rand(6, 400, generator=g) > 0.25).double() if pixels else None
    focal, dice = focal_dice(x, t, 0.25, gamma, pix)
    el = sigmoid_focal_loss(x, t, 0.25, gamma)
    ref_focal = el.mean(-1) if pix is None else (el * pix).sum(-1) / pix.sum(-1)
    ref_dice = dice_loss(x, t, pix)
    assert torch.allclose(focal, ref_focal, atol=1e-12) and torch.allclose(dice, ref_dice, atol=1e-12)
    wf, wd = torch.randn(6, generator=g, dtype=torch.double), torch.randn(6, generator=g, dtype=torch.double)
    (grad,) = torch.autograd.grad((focal * wf).sum() + (dice * wd).sum(), x)
    (ref,) = torch.autograd.grad((ref_focal * wf).sum() + (ref_dice * wd).sum(), x)
    assert torch.allclose(grad, ref, atol=1e-12)
    if pix is not None:  # pixels that take no part get no gradient
        assert grad[pix == 0].abs().max() == 0
    assert torch.autograd.gradcheck(lambda v: focal_dice(v, t, 0.25, gamma, pix), (x,))


@pytest.mark.parametrize("size", [(256, 192), (37, 50), (16, 12), (5, 7)])
def test_matrix_upsampling_equals_interpolate(size: tuple[int, int]) -> None:
    """Bilinear resizing as two matrix products: torch's values (align_corners=False), up and down."""
    from dtop_cli.model.loss import upsample_bilinear

    x = torch.randn(3, 4, 16, 12, dtype=torch.double, requires_grad=True)
    ours = upsample_bilinear(x, size)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-12)
    w = torch.randn_like(ref)
    (g1,) = torch.autograd.grad((ours * w).sum(), x)
    (g2,) = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_label_stride_takes_the_mask_terms_on_a_subgrid() -> None:
    """label_stride k: the mask terms equal those of the labels' every k-th pixel (the
    class presence still reads every pixel)."""
    g = torch.Generator().manual_seed(5)
    B, K = 2, 5
    small = torch.randint(0, K, (B, 12, 16), generator=g)
    small[0, :3] = IGNORE
    labels = small.repeat_interleave(2, -1).repeat_interleave(2, -2)  # 2x2 blocks: same classes on the subgrid
    presence = torch.randn(B, K, 2, generator=g)
    masks = torch.randn(B, K, 6, 8, generator=g)
    for ignored in ("negative", "excluded"):
        strided = ATMLoss(K, ignored_pixels=ignored, label_stride=2)(presence, masks, labels)
        direct = ATMLoss(K, ignored_pixels=ignored)(presence, masks, small)
        for k in strided:
            assert torch.allclose(strided[k], direct[k], atol=1e-6), (ignored, k)
    full = ATMLoss(K)(presence, masks, labels)
    assert not torch.allclose(full["loss_mask"], ATMLoss(K, label_stride=2)(presence, masks, labels)["loss_mask"])
    with pytest.raises(ValueError, match="label_stride"):
        ATMLoss(K, label_stride=0)
