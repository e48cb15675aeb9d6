"""DToP on mmseg's own plain-ViT segmenters (issue 13): SETR-Naive and Segmenter.

* threshold 1.0 is mmseg's model: mmseg builds each model from its own config file (shipped
  in the mmseg package), random weights and BatchNorm statistics are saved as an mmseg
  checkpoint, and mmseg's ``inference_model`` and ``api.predict`` label a non-square image
  alike in slide mode;
* with exits forced, the batched forward equals a per-image reference on active tokens;
* the dense GFLOPs equal mmseg's model counted by the same FlopAnalyzer and handles.

CPU time: the mmseg comparisons run the real config classes with fewer layers (ViT-L: 4)
where a full model would take minutes; the layers left are the configs' own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtop_cli import api
from dtop_cli import cost as FL
from dtop_cli import presets as P
from dtop_cli.model import exits as X
from dtop_cli.model.build import build_model
from dtop_cli.model.checkpoint import load_weights

MMSEG_CONFIGS = Path(__import__("mmseg").__file__).parent / ".mim" / "configs"

# preset -> (mmseg config, layers kept for the CPU test, our stage ends for those layers)
CASES = {
    "setr-naive-large-ade": ("setr/setr_vit-l_naive_8xb2-160k_ade20k-512x512.py", 4, [0, 1, 2, 3]),
    "segmenter-base-ade": ("segmenter/segmenter_vit-b_mask_8xb1-160k_ade20k-512x512.py", 12, [5, 7, 11]),
    "segmenter-large-ade": ("segmenter/segmenter_vit-l_mask_8xb1-160k_ade20k-512x512.py", 4, [1, 2, 3]),
}


def mmseg_config(name: str, layers: int | None):
    from mmengine.config import Config

    rel, keep, _ = CASES[name]
    cfg = Config.fromfile(str(MMSEG_CONFIGS / rel))
    layers = keep if layers is None else layers
    if layers != cfg.model.backbone.num_layers:
        cfg.model.backbone.num_layers = layers
        if "out_indices" in cfg.model.backbone and isinstance(cfg.model.backbone.out_indices, (tuple, list)):
            cfg.model.backbone.out_indices = tuple(range(layers - 4, layers))
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    return cfg


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (norms around 1) and non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or ".ln" in name or name.startswith("ln") or ".bn." in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def ours(name: str, layers: int | None = None, ends: list[int] | None = None) -> P.Preset:
    """Our preset for the mmseg config of CASES at `layers` (default: the test's)."""
    _, keep, case_ends = CASES[name]
    layers = keep if layers is None else layers
    ends = ends or (case_ends if layers == keep else list(range(layers - len(case_ends), layers)))
    p = P.load_preset(name)
    if layers == p.model.num_layers:
        return P.replace(p, **{"model.patch_bias": False})
    return P.replace(p, **{"model.num_layers": layers, "model.stage_ends": ends, "model.patch_bias": False})


def save_mmseg_model(name: str, path: Path):
    """Build mmseg's model from its config, randomise it, save it as mmseg would."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = mmseg_config(name, None)
    model = MODELS.build(cfg.model)
    randomise(model)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_threshold_one_equals_mmseg_inference(name, tmp_path):
    from mmseg.apis import inference_model, init_model

    ckpt = tmp_path / "mmseg.pth"
    cfg = save_mmseg_model(name, ckpt)
    ref_model = init_model(cfg, str(ckpt), device="cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 470, 3), dtype=np.uint8)  # non-square: two windows
    with torch.no_grad():
        ref = inference_model(ref_model, image).pred_sem_seg.data[0].numpy()

    model = api.load_model(ours(name), ckpt, threshold=1.0)
    new = model.dtop_new_keys
    if P.load_preset(name).model.aux_heads_added:  # Segmenter: only the added heads are new
        assert new and all(k.startswith("auxiliary_head.") for k in new)
    else:  # SETR: strictly
        assert new == []
    pred = api.predict(model, image, cost=False)
    assert pred.labels.shape == ref.shape == (300, 470)
    assert len(np.unique(ref)) > 5  # a real segmentation, not one class everywhere
    agree = float((pred.labels == ref).mean())
    print(f"{name}: {100 * agree:.4f}% of pixels agree")
    assert agree >= 0.999
    assert (pred.exit_stage == model.num_stages).all()


def test_zoo_layouts_load_as_the_issue_says(tmp_path):
    """SETR's file fits strictly; Segmenter's file: every key used, the added auxiliary heads
    reported as new keys, nothing else missing; a file lacking anything else is refused."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from dtop_cli.errors import UserError

    register_all_modules(init_default_scope=True)
    for name, layers, ends in (("setr-naive-large-ade", 4, [0, 1, 2, 3]), ("segmenter-base-ade", 3, [0, 1, 2])):
        cfg = mmseg_config(name, layers)
        p = ours(name, layers, ends)
        state = MODELS.build(cfg.model).state_dict()
        path = tmp_path / f"{name}.pth"
        torch.save({"state_dict": state, "meta": {}}, path)
        model = build_model(p)
        load_weights(model, path)
        own = set(model.state_dict())
        assert set(state) <= own, set(state) - own
        for k, v in state.items():
            assert torch.equal(model.state_dict()[k], v), k
        if "setr" in name:
            assert model.dtop_new_keys == []
        else:
            assert model.dtop_new_keys and all(k.startswith("auxiliary_head.") for k in model.dtop_new_keys)
            assert set(model.dtop_new_keys) == own - set(state)
            del state["decode_head.mask_norm.weight"]
            torch.save({"state_dict": state}, path)
            with pytest.raises(UserError, match="missing keys"):
                load_weights(build_model(p), path)


# --------------------------------------------------------------- exits: batched vs reference


def tiny(name: str) -> P.Preset:
    """The preset's architecture at toy width (same head types, class token, norms)."""
    p = P.load_preset(name)
    n_stages = p.num_stages
    ch = {"head.channels": 32} if p.model.head.type == "mask-transformer" else {"head.channels": 16}
    aux = {"aux_head.channels": 16} if p.model.aux_head is not None else {}
    return P.replace(p, **{"model.num_layers": n_stages, "model.stage_ends": list(range(n_stages)),
                           "model.embed_dims": 32, "model.num_heads": 2, "model.head.num_heads": 2,
                           **{f"model.{k}": v for k, v in {**ch, **aux}.items()},
                           "data.num_classes": 5, "data.crop": [64, 64]})


def reference_forward(model, img: torch.Tensor, forced: list[torch.Tensor]) -> torch.Tensor:
    """One image, only its active tokens, no padding: the definition of the pruned forward.
    Returns the merged logits (K, h, w) at token resolution."""
    bb = model.backbone
    x, (gh, gw) = bb.embed(img[None])
    cls = bb.class_token(1)
    N = gh * gw
    active = torch.arange(N)
    merged = None
    gone = torch.zeros(N, dtype=torch.bool)
    for s, (start, end) in enumerate(bb.stage_bounds()):
        x, cls = bb.run_stage(x, cls, start, end)
        _, logits = model.heads()[s](x)
        if merged is None:
            merged = logits[0].clone()
        else:
            merged[:, active] = logits[0]
        if s == len(bb.stage_ends) - 1:
            break
        leave = forced[s][active] & ~gone[active]
        if leave.all():
            leave[0] = False  # an image keeps one token (exits.compact)
        gone[active[leave]] = True
        x = x[:, ~leave]
        active = active[~leave]
    return merged.view(-1, gh, gw)


@pytest.mark.parametrize("name", list(CASES))
def test_forced_exits_batched_equals_per_image_reference(name):
    torch.manual_seed(0)
    model = build_model(tiny(name)).eval()
    randomise(model, seed=1)
    imgs = torch.randn(2, 3, 64, 80)
    N = (64 // 16) * (80 // 16)
    g = torch.Generator().manual_seed(0)
    forced = []
    for s in range(model.num_stages - 1):
        share = 0.4 if s == 0 else 0.3
        m = torch.rand(2, N, generator=g) < share
        m[1, : N // 2] = True if s == 0 else m[1, : N // 2]  # images leave different amounts
        forced.append(m)
    assert forced[0].float().mean() >= 0.3
    with torch.no_grad():
        out = model.forward_dtop(imgs, forced)
        assert (out.active_counts[:, 1] < N).all() and out.active_counts[0, 1] != out.active_counts[1, 1]
        for b in range(2):
            ref = reference_forward(model, imgs[b], [f[b] for f in forced])
            torch.testing.assert_close(out.stage_masks[-1][b], ref, atol=2e-5, rtol=1e-4)
            want = model.decode_head.class_scores(None, ref[None])[0]
            torch.testing.assert_close(out.scores[b], want, atol=2e-5, rtol=1e-4)


def test_threshold_rule_uses_best_class_probability():
    """Per-pixel heads: confidence = softmax over classes at token resolution, top-k kept."""
    torch.manual_seed(0)
    model = build_model(P.replace(tiny("segmenter-base-ade"), **{"exit.keep_topk": 1})).eval()
    randomise(model, seed=2)
    with torch.no_grad():
        x, _ = model.backbone.embed(torch.randn(1, 3, 64, 64))
        _, logits = model.heads()[0](x)
        probs = logits.softmax(1)
        thr = float(probs.max(1).values.median())
        want = X.exit_decision(probs, thr, model.keep_topk)
        with model.exit_mode(threshold=thr):
            got = model.leaving_tokens(0, None, logits, None, None, None)
    assert torch.equal(got, want) and got.any()


# --------------------------------------------------------------- GFLOPs vs mmseg's own count


class _MMSegForward(torch.nn.Module):
    """mmseg's inference forward of one window: encode_decode (decode head + resize)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        shape = x.shape[-2:]
        return self.model.encode_decode(x, [dict(img_shape=shape, ori_shape=shape, pad_shape=shape)])


def mmseg_gflops(cfg, hw) -> float:
    from mmseg.registry import MODELS

    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        fa = FL.flop_analyzer(_MMSegForward(model), (torch.randn(1, 3, *hw),))
        return fa.total() / 1e9


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_dense_gflops_equal_mmseg_count(name):
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    layers = 4
    cfg = mmseg_config(name, layers)
    p = P.replace(ours(name, layers), **{"model.patch_bias": True})
    cfg.model.backbone.patch_bias = True
    hw = tuple(p.data.crop)
    theirs = mmseg_gflops(cfg, hw)
    model = build_model(p, threshold=1.0).eval()
    mine = FL.count_gflops(model, torch.randn(1, 3, *hw))
    closed = FL.cost_from_counts(model, (hw[0] // 16, hw[1] // 16), [hw[0] * hw[1] // 256] * p.num_stages).total / 1e9
    print(f"{name} ({layers} layers): ours {mine:.4f} closed form {closed:.4f} mmseg {theirs:.4f}")
    assert mine == pytest.approx(theirs, rel=1e-3)
    assert closed == pytest.approx(mine, rel=1e-6)


def test_closed_form_equals_trace_with_exits():
    for name in CASES:
        torch.manual_seed(0)
        model = build_model(tiny(name), threshold=0.5).eval()
        N = 16
        forced = [torch.zeros(1, N, dtype=torch.bool) for _ in range(model.num_stages - 1)]
        forced[0][0, :7] = True
        img = torch.randn(1, 3, 64, 64)
        traced = FL.trace_flops(model, img, forced)
        with torch.no_grad():
            counts = model.forward_dtop(img, forced).active_counts[0].tolist()
        closed = FL.cost_from_counts(model, (4, 4), counts, aux_heads=True)
        for part in ("backbone", "heads", "resize"):
            assert getattr(closed, part) == pytest.approx(getattr(traced, part), rel=1e-6), (name, part)
        with model.exit_mode(threshold=1.0):  # dense: SETR's decode head runs as mmseg's
            dense = FL.trace_flops(model, img)
            closed = FL.cost_from_counts(model, (4, 4), [16] * model.num_stages)
        for part in ("backbone", "heads", "resize"):
            assert getattr(closed, part) == pytest.approx(getattr(dense, part), rel=1e-6), (name, part)


def test_aux_heads_cost_at_most_two_percent_of_the_backbone():
    for name in ("segmenter-base-ade", "segmenter-large-ade"):
        p = P.load_preset(name)
        model = build_model(p).eval()
        h, w = (c // 16 for c in p.data.crop)
        n = h * w
        full = FL.cost_from_counts(model, (h, w), [n] * p.num_stages, aux_heads=False)
        aux = FL.head_flops(model.auxiliary_head[0], n)
        share = aux / full.backbone
        print(f"{name}: each auxiliary head {100 * share:.2f}% of the backbone")
        assert share <= 0.02


def test_graph_runner_refuses_non_atm_heads():
    model = build_model(tiny("segmenter-base-ade"))
    assert not model.graph_ready
    with pytest.raises(ValueError, match="ATM"):
        model.enable_cuda_graphs(capture=False)
    assert build_model(P.load_preset("tiny-synthetic")).graph_ready


def test_final_output_is_mmseg_setr_decode_head_on_dense_tokens():
    """SETR's decode head: computing the logits per token and upsampling them equals mmseg's
    conv block -> x4 upsample -> classifier (the classifier commutes with bilinear)."""
    from mmseg.models.decode_heads import SETRUPHead

    torch.manual_seed(0)
    model = build_model(tiny("setr-naive-large-ade")).eval()
    randomise(model, seed=3)
    ref = SETRUPHead(in_channels=32, channels=16, in_index=0, num_classes=5, num_convs=1, up_scale=4,
                     kernel_size=1, norm_cfg=dict(type="BN"), dropout_ratio=0).eval()
    ref.load_state_dict(model.decode_head.state_dict(), strict=False)
    tokens = torch.randn(2, 6 * 5, 32)
    with torch.no_grad():
        _, logits = model.decode_head(tokens)
        ours_out = model.decode_head.class_scores(None, logits.view(2, 5, 6, 5))
        theirs = ref([tokens.transpose(1, 2).reshape(2, 32, 6, 5)])
    torch.testing.assert_close(ours_out, theirs, atol=1e-5, rtol=1e-4)
    assert F.softmax(ours_out, 1).shape == (2, 5, 24, 20)
