"""FLOP counting: the traced count (fvcore's convention) and the closed form agree, and the
paper's base GFLOPs come out of `dtop flops`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtop_cli import cost as FL
from dtop_cli import presets as P
from dtop_cli.commands import flops as FR
from dtop_cli.data.mmseg import central_window, paper_window, val_dataset
from dtop_cli.model.build import build_model
from dtop_cli.model.layers import explicit_attention


def tiny_model(threshold: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(P.load_preset("tiny-synthetic"), threshold=threshold).eval()


def exit_masks(N: int, leave1: int, leave2: int, seed: int = 0) -> list[torch.Tensor]:
    """Forced exits of a batch of one: `leave1` random tokens after stage 1, then `leave2`
    of the remaining ones after stage 2."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(N, generator=g)
    m1 = torch.zeros(1, N, dtype=torch.bool)
    m2 = torch.zeros(1, N, dtype=torch.bool)
    m1[0, order[:leave1]] = True
    m2[0, order[leave1:leave1 + leave2]] = True
    return [m1, m2]


def hand_formula(model, hw: tuple[int, int], counts: list[int], aux: bool, out_hw: tuple[int, int]) -> float:
    """The cost written out from the architecture's sizes, independently of flops.py:
    ViT layer = 2 norms (5/elt) + qkv + out-proj + FFN (all ~ n) + 2 attention matmuls (~ n^2)."""
    bb = model.backbone
    D = bb.patch_embed.projection.out_channels
    hid = bb.layers[0].ffn.layers[0][0].out_features
    ps = bb.patch_size
    total = hw[0] * hw[1] * D * 3 * ps * ps
    for s, (start, end) in enumerate(bb.stage_bounds()):
        n = counts[s]
        total += (end - start) * (n * (2 * 5 * D + 3 * D * D + D * D + 2 * D * hid) + 2 * n * n * D)
        if aux or s == len(counts) - 1:
            h = model.heads()[s]
            K, C, Din = h.q.num_embeddings, h.input_proj.out_features, h.input_proj.in_features
            F4 = h.decoder.layers[0].linear1.out_features
            per_layer = (K * C * 3 * C + 2 * K * K * C + K * C * C  # query self-attention
                         + 3 * 5 * K * C  # three post-norms
                         + K * C * C + 2 * n * C * C + 2 * K * n * C + K * C * C  # cross-attention
                         + 2 * K * C * F4)  # FFN
            total += n * Din * C + 5 * n * C + len(h.decoder.layers) * per_layer + K * C * 2
    total += 4 * model.decode_head.num_classes * out_hw[0] * out_hw[1]
    return total / 1e9


# ----------------------------------------------------------------- the SDPA rule


class _SDPA(nn.Module):
    def forward(self, q, k, v, valid):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])


class _Explicit(nn.Module):
    def forward(self, q, k, v, valid):
        return explicit_attention(q, k, v, valid)


def test_sdpa_counts_the_same_as_explicit_attention():
    B, h, L, S, E, Ev = 2, 3, 7, 5, 4, 6
    q, k, v = torch.randn(B, h, L, E), torch.randn(B, h, S, E), torch.randn(B, h, S, Ev)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, -2:] = False
    with torch.no_grad():
        fa_sdpa = FL.flop_analyzer(_SDPA(), (q, k, v, valid))
        fa_expl = FL.flop_analyzer(_Explicit(), (q, k, v, valid))
        n_sdpa, n_expl = fa_sdpa.total(), fa_expl.total()
    assert n_sdpa == n_expl == B * h * L * S * (E + Ev)
    assert fa_sdpa.by_operator()["scaled_dot_product_attention"] == n_sdpa
    assert not fa_sdpa.unsupported_ops() and not fa_expl.unsupported_ops()


def test_stock_counter_misses_sdpa_and_ours_does_not():
    """The reason for the extra rule: mmengine's counter alone counts SDPA as zero."""
    from mmengine.analysis import FlopAnalyzer

    q = torch.randn(1, 2, 8, 4)
    fa = FlopAnalyzer(_SDPA(), (q, q, q, torch.ones(1, 8, dtype=torch.bool)))
    fa.unsupported_ops_warnings(False)
    assert fa.total() == 0
    ours = FL.flop_analyzer(_SDPA(), (q, q, q, torch.ones(1, 8, dtype=torch.bool))).total()
    assert ours == 2 * 2 * 8 * 8 * 4


# ----------------------------------------------------------------- trace == closed form


@pytest.mark.parametrize("size,leave1,leave2", [
    ((128, 192), 0, 0),  # exits active but nobody leaves: aux heads still run on all tokens
    ((128, 192), 40, 30),
    ((128, 192), 90, 5),
    ((128, 192), 95, 0),  # one token left (the rule: an image keeps at least one)
    ((144, 160), 17, 60),  # grid 9x10
])
def test_forced_exits_trace_equals_closed_form(size, leave1, leave2):
    model = tiny_model()
    H, W = size
    hw = (H // 16, W // 16)
    N = hw[0] * hw[1]
    masks = exit_masks(N, leave1, leave2)
    with torch.no_grad():
        out = model.forward_dtop(torch.randn(1, 3, H, W), masks)
    counts = out.active_counts[0].tolist()
    assert counts == [N, N - leave1, N - leave1 - leave2]
    traced = FL.count_gflops(model, torch.randn(1, 3, H, W), masks)
    closed = FL.gflops_from_counts(model, hw, counts, aux_heads=True)
    assert traced == pytest.approx(closed, rel=1e-12, abs=0)
    assert closed == pytest.approx(hand_formula(model, hw, counts, True, (H, W)), rel=1e-12, abs=0)


def test_closed_form_linear_in_tokens_plus_quadratic_attention():
    """Backbone cost of a stage: a*n + b*n^2 with b = 2*D per layer (the two attention matmuls)."""
    model = tiny_model()
    D = model.backbone.patch_embed.projection.out_channels
    layer = model.backbone.layers[0]
    f = [FL.vit_layer_flops(layer, n) for n in (0, 10, 20, 30)]
    assert f[0] == 0
    second_diff = f[3] - 2 * f[2] + f[1]  # = 2*b*10^2
    assert second_diff == 2 * (2 * D) * 100
    # the heads: K queries fixed, so linear in the tokens they read
    head = model.decode_head
    g = [FL.atm_head_flops(head, n) for n in (10, 20, 30)]
    assert g[2] - 2 * g[1] + g[0] == 0 and g[1] > g[0]


def test_threshold_exit_path_trace_equals_closed_form_and_counts_no_unknown_op():
    """The real (unforced) exit rule at a low threshold on random weights: many tokens leave."""
    model = tiny_model(threshold=0.05)
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        out = model.forward_dtop(x)
        counts = out.active_counts[0].tolist()
        assert counts[1] < counts[0]
        fa = FL.flop_analyzer(FL._CountedForward(model), (x,))
        traced = fa.total() / 1e9
    assert not fa.unsupported_ops(), fa.unsupported_ops()
    assert traced == pytest.approx(FL.gflops_from_counts(model, (8, 12), counts), rel=1e-12, abs=0)


def test_threshold_one_dense_trace_skips_aux_heads():
    model = tiny_model()
    x = torch.randn(1, 3, 128, 128)
    br = FL.trace_flops(model, x)
    assert br.heads == FL.atm_head_flops(model.decode_head, 64)
    assert br.resize == 4 * model.decode_head.num_classes * 128 * 128
    assert br.total / 1e9 == pytest.approx(FL.gflops_from_counts(model, (8, 8), [64] * 3), rel=1e-12, abs=0)
    assert FL.gflops_from_counts(model, (8, 8), [64] * 3) < FL.gflops_from_counts(model, (8, 8), [64] * 3,
                                                                                   aux_heads=True)


def test_batch_count_is_per_image():
    model = tiny_model()
    one = FL.count_gflops(model, torch.randn(1, 3, 64, 64))
    three = FL.count_gflops(model, torch.randn(3, 3, 64, 64))
    assert three == pytest.approx(one, rel=1e-12)


def test_windows_sum_and_api_predict_uses_the_counter():
    from dtop_cli import api

    model = api.load_model("tiny-synthetic", threshold=1.0)
    img = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    pred = api.predict(model, img)
    static = FL.count_gflops(model, torch.randn(1, 3, 256, 256))
    assert pred.gflops == pytest.approx(static, rel=1e-12)
    assert pred.gflops_protocol == pytest.approx(static, rel=1e-12)  # one crop-size window
    # a window not a multiple of the patch: grid rounds up, the resize is to the window itself
    odd = FL.protocol_gflops(model, [(200, 300, [13 * 19] * 3)])
    assert odd == pytest.approx(FL.count_gflops(model, torch.randn(1, 3, 200, 300)), rel=1e-12)
    both = FL.protocol_gflops(model, [(256, 256, [256] * 3), (200, 300, [247] * 3)])
    assert both == pytest.approx(static + odd)


# ----------------------------------------------------------------- static / dataset


def test_static_counts_aux_heads_only_below_threshold_one():
    base = FR.static_gflops("tiny-synthetic")
    pruned = FR.static_gflops("tiny-synthetic", threshold=0.9)
    model = tiny_model()
    aux = sum(FL.atm_head_flops(h, 256) for h in model.auxiliary_head) / 1e9
    by_hand = hand_formula(model, (16, 16), [256] * 3, False, (256, 256))
    assert base["gflops"] == pytest.approx(by_hand, rel=1e-12)
    assert pruned["gflops"] - base["gflops"] == pytest.approx(aux, rel=1e-9)
    assert base["exit_share"] == [0.0, 0.0, 1.0] and base["images"] == 1
    ade = P.load_preset("segvit-base-ade")
    assert FR._paper_gflops(ade, 1.0, (512, 512), dynamic=False) == 109.9
    assert FR._paper_gflops(ade, 0.9, (512, 512), dynamic=False) is None  # nothing exits: not the average
    assert FR._paper_gflops(ade, 0.9, (512, 512), dynamic=True) == 86.8
    assert FR._paper_gflops(ade, 1.0, (256, 256), dynamic=False) is None
    assert sum(base["breakdown"].values()) == pytest.approx(base["gflops"])


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from dtop_cli.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, n_train=1, n_val=3)
    return root


def _dataset_cost(model, root, thresholds, images=None):
    from dtop_cli.measure import measure

    model.dtop_preset = P.load_preset("tiny-synthetic")
    ds = val_dataset(model.dtop_preset, root, images)
    return [t.result() for t in measure(model, ds, thresholds, miou=False, cost=True)]


def test_dataset_at_threshold_one_equals_static(synthetic_root):
    model = tiny_model()
    (res,) = _dataset_cost(model, synthetic_root, [1.0])
    static = FR.static_gflops("tiny-synthetic")
    assert res["images"] == 3
    assert res["gflops"] == pytest.approx(static["gflops"], rel=1e-12)
    assert res["exit_share"] == [0.0, 0.0, 1.0]


def test_dataset_dynamic_equals_trace_of_each_image(synthetic_root):
    import mmcv

    model = tiny_model(threshold=0.9)
    (res,) = _dataset_cost(model, synthetic_root, [0.05], images=2)
    assert model.threshold == 0.9  # restored
    assert res["images"] == 2 and res["threshold"] == 0.05
    assert sum(res["exit_share"]) == pytest.approx(1.0) and res["exit_share"][0] > 0
    traced = []
    ds = val_dataset(model.dtop_preset, synthetic_root, 2, pipeline=[])
    with model.exit_mode(threshold=0.05):
        for i in range(2):
            img = mmcv.imread(ds.get_data_info(i)["img_path"])
            traced.append(FL.count_gflops(model, paper_window(model, img, (256, 256))))
    assert res["gflops"] == pytest.approx(sum(traced) / 2, rel=1e-12)
    assert res["gflops"] < FR.static_gflops("tiny-synthetic", threshold=0.05)["gflops"]


def test_crop_window_is_central_and_keeps_short_sides():
    img = np.arange(10 * 30).reshape(10, 30)
    w = central_window(img, (8, 8))
    assert w.shape == (8, 8) and w[0, 0] == img[1, 11]
    assert central_window(img, (16, 16)).shape == (10, 16)


# ----------------------------------------------------------------- the paper's numbers


PAPER_PRESETS = ["segvit-base-ade", "segvit-large-ade", "segvit-large-pc", "segvit-large-cocostuff"]


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_closed_form_matches_paper_base_gflops(name):
    """Fast: the closed form on the real architecture (no forward)."""
    p = P.load_preset(name)
    with FR._skip_weight_init():
        model = build_model(p, threshold=1.0)
    H, W = p.data.crop
    g = FL.gflops_from_counts(model, (H // 16, W // 16), [H * W // 256] * 3)
    assert g == pytest.approx(p.paper.base_gflops, rel=0.005)


def test_traced_base_ade_matches_public_breakdown():
    """method.md: 109.70 = backbone 107.00 + last head 2.547 + final resize 0.157."""
    res = FR.static_gflops("segvit-base-ade")
    assert res["breakdown"]["backbone"] == pytest.approx(107.00, abs=0.005)
    assert res["breakdown"]["heads"] == pytest.approx(2.547, abs=0.0005)
    assert res["breakdown"]["resize"] == pytest.approx(0.157, abs=0.0005)
    assert res["gflops"] == pytest.approx(109.9, rel=0.005)
    assert res["paper_gflops"] == 109.9


@pytest.mark.slow
@pytest.mark.parametrize("name,public", [("segvit-large-ade", 616.73), ("segvit-large-pc", 315.30),
                                         ("segvit-large-cocostuff", 366.68)])
def test_traced_vit_large_matches_paper(name, public):
    res = FR.static_gflops(name)
    assert res["gflops"] == pytest.approx(public, abs=0.01)
    assert res["gflops"] == pytest.approx(P.load_preset(name).paper.base_gflops, rel=0.005)


# ----------------------------------------------------------------- CLI


def test_cli_flops_json_static(run_cli):
    r = run_cli(["flops", "--preset", "tiny-synthetic", "--shape", "128", "192", "--json"])
    assert r.code == 0, r.err
    obj = r.json()
    assert {"gflops", "images", "exit_share"} <= set(obj)
    assert obj["images"] == 1 and obj["exit_share"] == [0.0, 0.0, 1.0] and obj["shape"] == [128, 192]
    traced = FL.count_gflops(tiny_model(), torch.zeros(1, 3, 128, 192))
    assert obj["gflops"] == pytest.approx(traced, rel=1e-12)


def test_cli_flops_table_and_bad_input(run_cli):
    r = run_cli(["flops", "--preset", "tiny-synthetic"])
    assert r.code == 0 and "backbone" in r.out and "resize" in r.out
    for argv in (["--images", "3"], ["--thresh", "1.5"], ["--shape", "0", "64"]):
        bad = run_cli(["flops", "--preset", "tiny-synthetic", *argv])
        assert bad.code == 2 and bad.err.count("\n") == 1 and "Traceback" not in bad.err, (argv, bad.err)


def test_cli_flops_with_checkpoint_over_images(run_cli, synthetic_root, tmp_path):
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": tiny_model().state_dict(), "meta": {}}, ckpt)
    r = run_cli(["flops", "--preset", "tiny-synthetic", "--ckpt", str(ckpt), "--thresh", "1.0",
                 "--images", "2", "--data-root", str(synthetic_root), "--device", "cpu", "--json"])
    assert r.code == 0, r.err
    obj = r.json()
    assert obj["images"] == 2 and obj["exit_share"] == [0.0, 0.0, 1.0]
    assert obj["gflops"] == pytest.approx(FR.static_gflops("tiny-synthetic")["gflops"], rel=1e-12)
    missing = run_cli(["flops", "--preset", "tiny-synthetic", "--ckpt", str(ckpt),
                       "--data-root", str(tmp_path / "nowhere")])
    assert missing.code == 2 and "no validation images" in missing.err
