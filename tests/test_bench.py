"""`dtop bench` and the staged (graph-ready) inference: shapes, counts and equivalences.

No timing assertions here: speed is measured by benchmarks/bench_pruning.py and the
bench command itself. These tests check that what is timed is the right computation.
"""

from __future__ import annotations

import json

import pytest
import torch

from dtop_cli import presets as P
from dtop_cli.commands import bench as BN
from dtop_cli.errors import UserError
from dtop_cli.model.build import build_model
from dtop_cli.model.graphs import next_width, round_up

CONTRACT_KEYS = {"dense_ms", "pruned_ms", "speedup", "flop_ratio", "device", "dtype", "batch"}


def tiny_model(threshold: float = 0.9, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(P.load_preset("tiny-synthetic"), threshold=threshold).eval()


def varied_masks(B: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    """Nested forced exits with a different count per image (so the batch needs padding)."""
    g = torch.Generator().manual_seed(seed)
    m1 = torch.zeros(B, N, dtype=torch.bool)
    m2 = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        order = torch.randperm(N, generator=g)
        n1, n2 = 3 + 7 * b, 10 + 9 * b
        m1[b, order[:n1]] = True
        m2[b, order[:n2]] = True
    return [m1, m2]


# ----------------------------------------------------------------- forced exits


def test_parse_exits_accepts_cumulative_shares_and_rejects_the_rest():
    assert BN.parse_exits("0.3,0.65", 2) == (0.3, 0.65)
    assert BN.parse_exits("0,0", 2) == (0.0, 0.0)
    for bad in ("0.3", "0.3,0.2", "0.5,1.0", "-0.1,0.2", "a,b", "0.1,0.2,0.3"):
        with pytest.raises(UserError):
            BN.parse_exits(bad, 2)


def test_forced_masks_are_nested_equal_per_image_and_seeded():
    B, N = 3, 100
    masks = BN.forced_exit_masks(B, N, (0.3, 0.65))
    assert [m.shape for m in masks] == [(B, N), (B, N)]
    assert masks[0].sum(1).tolist() == [30] * B
    assert masks[1].sum(1).tolist() == [65] * B
    assert not (masks[0] & ~masks[1]).any()  # cumulative: retired after stage 1 stays retired
    assert not torch.equal(masks[0][0], masks[0][1])  # each image draws its own positions
    again = BN.forced_exit_masks(B, N, (0.3, 0.65))
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    assert BN.stage_counts(N, (0.3, 0.65)) == [100, 70, 35]


@pytest.mark.parametrize("shares", [(0.0, 0.0), (0.3, 0.65), (0.5, 0.8), (0.9, 0.99)])
def test_forced_shares_give_the_token_counts_each_stage_runs_on(shares):
    model = tiny_model()
    B, H, W = 2, 128, 160
    N = (H // 16) * (W // 16)
    masks = BN.forced_exit_masks(B, N, shares)
    with torch.no_grad():
        out = model.forward_dtop(torch.randn(B, 3, H, W), forced_exits=masks)
    expected = BN.stage_counts(N, shares)
    assert out.active_counts.tolist() == [expected] * B
    assert (out.exit_stage.flatten(1) == 1).sum(1).tolist() == [N - expected[1]] * B
    assert (out.exit_stage.flatten(1) == 3).sum(1).tolist() == [expected[2]] * B


def test_ideal_ratio_is_token_layer_work():
    model = build_model(P.load_preset("tiny-synthetic"))  # stages of 2, 2, 2 layers
    assert BN.ideal_ratio(model, [100, 100, 100]) == 1.0
    assert BN.ideal_ratio(model, [100, 70, 35]) == pytest.approx(600 / (200 + 140 + 70))


# ----------------------------------------------------------------- the report


def test_run_bench_reports_times_ratios_and_memory():
    r = BN.run_bench(BN.BenchOptions("tiny-synthetic", exits="0.3,0.65", repeats=2, warmup=1, batch=2))
    assert CONTRACT_KEYS <= set(r)
    assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["batch"] == 2 and r["mode"] == "forced"
    assert len(r["dense_runs_ms"]) == len(r["pruned_runs_ms"]) == 2
    assert r["dense_ms"] > 0 and r["pruned_ms"] > 0
    assert r["speedup"] == pytest.approx(r["dense_ms"] / r["pruned_ms"]) and r["speedup_paired"] > 0
    assert r["active_counts"] == [256, 179, 90]
    assert r["exit_share"] == pytest.approx([77 / 256, 89 / 256, 90 / 256])
    assert r["flop_ratio"] == pytest.approx(r["dense_gflops"] / r["pruned_gflops"])
    assert r["flop_ratio"] > 1 and r["ideal_ratio"] == pytest.approx(6 / (2 + 2 * 179 / 256 + 2 * 90 / 256))
    assert r["dense_peak_mb"] > 0 and r["pruned_peak_mb"] > 0 and "allocator" in r["memory_measure"]
    assert r["graphs"] is False
    json.dumps(r)  # all plain values


def test_flop_ratio_below_one_when_nothing_exits():
    """The auxiliary heads count in the pruned path: with no exits it costs more."""
    from dtop_cli.cost import count_gflops

    r = BN.run_bench(BN.BenchOptions("tiny-synthetic", exits="0,0", repeats=1, warmup=0, memory=False))
    assert r["flop_ratio"] < 1 and r["ideal_ratio"] == 1.0
    assert r["dense_peak_mb"] is None and r["memory_measure"] is None
    # the closed form bench uses is the traced count of the same forward
    model = tiny_model()
    x = torch.randn(1, 3, 256, 256)
    masks = BN.forced_exit_masks(1, 256, (0.0, 0.0))
    assert r["pruned_gflops"] == pytest.approx(count_gflops(model, x, masks), rel=1e-9)
    model.threshold = 1.0
    assert r["dense_gflops"] == pytest.approx(count_gflops(model, x), rel=1e-9)


def test_threshold_path_with_checkpoint_on_images(tmp_path):
    from dtop_cli.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "data", seed=0, n_train=1, n_val=2, size=256)
    model = tiny_model()
    ckpt = tmp_path / "tiny.pth"
    torch.save({"meta": {"dtop": {"threshold": 0.05}}, "state_dict": model.state_dict()}, ckpt)
    r = BN.run_bench(BN.BenchOptions("tiny-synthetic", ckpt=ckpt, data_root=tmp_path / "data", batch=3,
                                     repeats=1, warmup=0, memory=False))
    assert r["mode"] == "threshold" and r["threshold"] == 0.05 and r["inputs"] == "images"
    assert r["active_counts"][0] == 256 and r["active_counts"][2] < 256  # the real rule retired tokens
    r2 = BN.run_bench(BN.BenchOptions("tiny-synthetic", ckpt=ckpt, thresh=0.5, repeats=1, warmup=0, memory=False))
    assert r2["threshold"] == 0.5 and r2["inputs"] == "random"


def test_peak_memory_sees_a_temporary_tensor():
    def fn():
        t = torch.ones(256, 1024)  # 1 MiB, freed on return
        return float(t.sum())

    peak = BN.peak_memory_bytes(fn, torch.device("cpu"))
    assert peak is not None and 2**20 <= peak < 2 * 2**20


# ----------------------------------------------------------------- the CLI


def test_cli_bench_json_and_table(run_cli):
    res = run_cli(["bench", "--preset", "tiny-synthetic", "--exits", "0.5,0.8", "--repeats", "1", "--warmup", "0",
                   "--no-memory", "--json"])
    assert res.code == 0, res.err
    obj = res.json()
    assert CONTRACT_KEYS <= set(obj) and obj["exits"] == [0.5, 0.8]
    res = run_cli(["bench", "--preset", "tiny-synthetic", "--exits", "0.5,0.8", "--repeats", "1", "--warmup", "0",
                   "--no-memory"])
    assert res.code == 0 and "dense / pruned" in res.out and "GFLOPs" in res.out


@pytest.mark.parametrize("args,message", [
    (["--exits", "0.7,0.2"], "cannot decrease"),
    (["--exits", "0.3"], "needs 2 shares"),
    ([], "--exits"),
    (["--exits", "0.3,0.6", "--thresh", "0.5"], "--thresh"),
    (["--exits", "0.3,0.6", "--dtype", "int8"], "--dtype"),
    (["--exits", "0.3,0.6", "--device", "tpu"], "--device"),
    (["--exits", "0.3,0.6", "--graphs", "on"], "cuda"),
])
def test_cli_bench_bad_input_exits_2(run_cli, args, message):
    res = run_cli(["bench", "--preset", "tiny-synthetic", "--repeats", "1", *args])
    assert res.code == 2
    assert message in res.err and "Traceback" not in res.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_cli_bench_cuda_without_cuda_is_a_user_error(run_cli):
    res = run_cli(["bench", "--preset", "tiny-synthetic", "--exits", "0.3,0.6", "--device", "cuda"])
    assert res.code == 2 and "CUDA" in res.err


# ----------------------------------------------------------------- staged inference (graph runner)


def test_widths_round_up_to_bucket_and_never_grow():
    assert round_up(41, 16) == 48 and round_up(48, 16) == 48
    assert next_width(41, 27, 48, 16) == (48, True)
    assert next_width(32, 32, 48, 16) == (32, False)  # equal counts on a bucket edge: no padding
    assert next_width(47, 47, 47, 16) == (47, False)  # never wider than the batch it comes from
    assert next_width(30, 30, 48, 16) == (32, True)


@pytest.mark.parametrize("bucket", [1, 4, 16])
def test_staged_runner_equals_eager_forward_with_forced_exits(bucket):
    model = tiny_model()
    B, H, W = 3, 96, 128
    N = (H // 16) * (W // 16)
    masks = varied_masks(B, N)
    x = torch.randn(B, 3, H, W)
    with torch.no_grad():
        ref = model.forward_dtop(x, forced_exits=masks)
        model.enable_cuda_graphs(bucket=bucket, capture=False)
        try:
            for _ in range(2):  # the second call reuses the buffers of the first
                got = model.forward_dtop(x, forced_exits=masks)
            runner = model.graph_runner
        finally:
            model.disable_cuda_graphs()
    assert len(runner._states) == 1
    widths = sorted(k[1] for st in runner._states.values() for k in st.graphs)
    assert all(w % bucket == 0 or w == N for w in widths)
    assert torch.equal(got.active_counts, ref.active_counts)
    assert torch.equal(got.exit_stage, ref.exit_stage)
    assert torch.allclose(got.scores, ref.scores, atol=1e-5)
    for a, b in zip(got.stage_masks, ref.stage_masks):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(got.stage_presence, ref.stage_presence):
        assert torch.allclose(a, b, atol=1e-5)


def test_staged_runner_equals_eager_forward_with_threshold_rule_and_dense():
    model = tiny_model(threshold=0.2)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = model.forward_dtop(x)
        model.enable_cuda_graphs(bucket=8, capture=False)
        got = model.forward_dtop(x)
        model.threshold = 1.0
        dense = model.forward_dtop(x)
        model.disable_cuda_graphs()
        dense_ref = model.forward_dtop(x)
    assert ref.active_counts[:, 2].lt(64).all()  # the rule retired tokens
    assert torch.equal(got.active_counts, ref.active_counts)
    assert torch.equal(got.exit_stage, ref.exit_stage)
    assert torch.allclose(got.scores, ref.scores, atol=1e-5)
    assert torch.allclose(dense.scores, dense_ref.scores, atol=1e-6)


def test_staged_runner_stays_out_of_training_and_gradients():
    model = tiny_model()
    model.enable_cuda_graphs(capture=False)
    x = torch.randn(1, 3, 64, 64)
    assert not model.graph_runner.accepts(model, x)  # gradients on
    with torch.no_grad():
        assert model.graph_runner.accepts(model, x)
        model.eval_stage = 1
        assert not model.graph_runner.accepts(model, x)
        model.eval_stage = None
        model.train()
        assert not model.graph_runner.accepts(model, x)
    capturing = model.graph_runner.__class__(capture=True)
    with torch.no_grad():
        assert not capturing.accepts(model.eval(), x)  # CPU tensors are never captured


def test_cached_key_value_weights_follow_weight_updates():
    """The inference-time copy of the heads' concatenated k/v weights is never stale."""
    model = tiny_model()
    head = model.decode_head
    tokens = torch.randn(1, 20, 96)
    with torch.no_grad():
        before = head(tokens)[1]
        assert torch.equal(head(tokens)[1], before)  # cached path, same result
        head.decoder.layers[0].multihead_attn.k.weight.mul_(2.0)  # in-place, as an optimiser or load does
        after = head(tokens)[1]
    assert not torch.allclose(after, before)
    with torch.enable_grad():
        live = head(tokens)[1]  # the differentiable path concatenates afresh
    assert torch.allclose(live, after, atol=1e-6)


def test_bench_images_are_the_validation_split_lists_images(tmp_path):
    """Pascal-Context keeps train and val images in one folder: the bench reads val.txt."""
    from test_prepare_pascal_context import build_pascal
    from test_prepare_then_train import SHRINK

    from dtop_cli.data import prepare_dataset
    from dtop_cli.data.mmseg import dataset_root, paper_window, read_test_image

    tar, js, _, _ = build_pascal(tmp_path)
    prepare_dataset("pascal-context", [tar, js], tmp_path / "data", workers=1)
    p = P.load_preset("segvit-large-pc", SHRINK)
    model = build_model(p)
    root = dataset_root(p, tmp_path / "data")
    val = (root / p.data.val_split.list).read_text().split()
    jpegs = sorted((root / p.data.val_split.img).glob("*.jpg"))
    assert jpegs[0].stem not in val  # the folder's first image is a training image
    x = BN.image_batch(model, p, tmp_path / "data", 3)
    crop = tuple(p.data.crop)
    for i in range(3):  # the list's images, in its order, repeated when the batch is larger
        want = paper_window(model, read_test_image(p, root / p.data.val_split.img / f"{val[i % len(val)]}.jpg"), crop)
        assert torch.equal(x[i:i + 1], want)
    assert not torch.equal(x[:1], paper_window(model, read_test_image(p, jpegs[0]), crop))
