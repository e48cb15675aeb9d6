"""Preset -> mmengine config: values, --max-iters scaling, export/reload, atomic checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config

from dtop_cli.data.mmseg import pipelines
from dtop_cli.errors import UserError
from dtop_cli.presets import load_preset
from dtop_cli.runtime import hooks  # noqa: F401  (registers AtomicCheckpointHook)
from dtop_cli.runtime.checkpoints import latest_checkpoint
from dtop_cli.runtime.config import RunOptions, build_config, schedule, write_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return load_preset("tiny-synthetic")


def _cfg(preset, phase="base", tmp=Path("/nonexistent"), *, world_size=1, cuda=False, load_from=None,
         pretrained=None, **opts):
    run = RunOptions(phase, data_root=tmp / "data", work_dir=tmp / "wd", **opts)
    return build_config(preset, run, load_from=load_from, pretrained=pretrained, world_size=world_size, cuda=cuda)


# --------------------------------------------------------------------------- schedule


def test_schedule_full_length_comes_from_the_preset() -> None:
    p = load_preset("segvit-base-ade")
    s = schedule(p, "base")
    assert (s.iters, s.warmup, s.poly_end) == (p.schedule.base.iters, p.optim.warmup_iters,
                                                p.schedule.base.poly_iters)
    s = schedule(p, "prune")
    assert (s.iters, s.poly_end) == (p.schedule.prune.iters, p.schedule.prune.poly_iters)


def test_max_iters_scales_warmup_and_poly_horizon() -> None:
    p = load_preset("segvit-base-ade")  # base: 40k iters, poly horizon 160k, warm-up 1500
    s = schedule(p, "base", max_iters=400)
    f = 400 / p.schedule.base.iters
    assert s.iters == 400
    assert s.warmup == round(p.optim.warmup_iters * f) == 15
    assert s.poly_end == round(p.schedule.base.poly_iters * f) == 1600
    assert s.val_interval == 400 and s.checkpoint_interval == 400  # capped at the run length
    tiny = load_preset("tiny-synthetic")
    s = schedule(tiny, "base", max_iters=3)
    assert s.iters == 3 and 1 <= s.warmup <= 3 and s.poly_end > s.warmup
    with pytest.raises(UserError):
        schedule(tiny, "base", max_iters=0)
    with pytest.raises(UserError):
        schedule(tiny, "finetune")


# --------------------------------------------------------------------------- config values


def test_config_values_follow_the_preset(tiny, tmp_path: Path) -> None:
    cfg = _cfg(tiny, tmp=tmp_path)
    o = tiny.optim
    opt = cfg.optim_wrapper
    assert opt.type == "OptimWrapper"
    assert opt.optimizer == dict(type="AdamW", lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    for key in ("decode_head", "auxiliary_head"):
        assert opt.paramwise_cfg.custom_keys[key] == dict(lr_mult=o.head_lr_mult)
    warm, poly = cfg.param_scheduler
    assert (warm.type, warm.start_factor, warm.begin, warm.end) == (
        "LinearLR", o.warmup_ratio, 0, o.warmup_iters)
    assert (poly.type, poly.power, poly.eta_min) == ("PolyLR", o.poly_power, 0.0)
    assert (poly.begin, poly.end) == (o.warmup_iters, tiny.schedule.base.poly_iters)
    assert not warm.by_epoch and not poly.by_epoch
    assert cfg.train_cfg == dict(type="DToPTrainLoop", max_iters=tiny.schedule.base.iters,
                                 val_interval=tiny.schedule.val_interval)
    ck = cfg.default_hooks.checkpoint
    assert (ck.type, ck.interval, ck.max_keep_ckpts, ck.save_last, ck.by_epoch) == (
        "AtomicCheckpointHook", tiny.schedule.checkpoint_interval, 2, True, False)
    assert cfg.train_dataloader.batch_size == tiny.data.batch_size
    assert cfg.train_dataloader.sampler.type == "InfiniteSampler"
    assert cfg.val_dataloader.batch_size == 1
    assert cfg.train_dataloader.num_workers <= (os.cpu_count() or 1)
    assert cfg.val_evaluator == dict(type="IoUMetric", iou_metrics=["mIoU"])
    assert cfg.default_scope == "mmseg"
    assert {"dtop_cli.model", "dtop_cli.runtime.hooks", "dtop_cli.data.transforms"} <= set(cfg.custom_imports.imports)
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    assert cfg.model.type == "DToPSegmentor"
    assert cfg.model.exit_cfg.threshold == 1.0  # base phase: nothing exits
    ds = cfg.train_dataloader.dataset
    assert ds.data_root == str((tmp_path / "data" / tiny.data.root).resolve())
    assert ds.data_prefix == dict(img_path=tiny.data.train_split.img, seg_map_path=tiny.data.train_split.ann)
    assert ds.reduce_zero_label is True
    assert len(ds.metainfo["classes"]) == tiny.data.num_classes
    steps = [t["type"] for t in ds.pipeline]
    expected = ["LoadSegPair", "RandomResize", "RandomCrop", "RandomFlip",
                "PhotoMetricDistortion", "PackSegInputs"]
    if not tiny.data.photometric:
        expected.remove("PhotoMetricDistortion")
    assert steps == expected
    assert ds.pipeline[0] == dict(type="LoadSegPair", dataset=tiny.data.dataset)
    rr = ds.pipeline[1]
    assert rr["scale"] == tuple(tiny.data.train_scale) and rr["ratio_range"] == tuple(tiny.data.resize_ratio)
    assert ds.pipeline[2]["crop_size"] == tuple(tiny.data.crop)
    assert [t["type"] for t in cfg.val_dataloader.dataset.pipeline] == [
        "LoadImageFromFile", "Resize", "LoadAnnotations", "PackSegInputs"]
    assert cfg.work_dir == str((tmp_path / "wd").resolve())
    assert cfg.load_from is None and cfg.resume is False


def test_max_iters_in_the_config(tiny, tmp_path: Path) -> None:
    cfg = _cfg(tiny, "prune", tmp=tmp_path, max_iters=20)
    f = 20 / tiny.schedule.prune.iters
    warm, poly = cfg.param_scheduler
    assert cfg.train_cfg.max_iters == 20
    assert warm.end == poly.begin == max(1, round(tiny.optim.warmup_iters * f))
    assert poly.end == round(tiny.schedule.prune.poly_iters * f)
    assert cfg.default_hooks.checkpoint.interval == min(tiny.schedule.checkpoint_interval, 20)


def test_prune_phase_threshold_topk_and_weights(tiny, tmp_path: Path) -> None:
    ckpt = tmp_path / "base.pth"
    cfg = _cfg(tiny, "prune", tmp=tmp_path, load_from=ckpt)
    assert cfg.model.exit_cfg == dict(threshold=tiny.exit.threshold, keep_topk=tiny.exit.keep_topk)
    assert cfg.load_from == str(ckpt.resolve())
    cfg = _cfg(tiny, "prune", tmp=tmp_path, threshold=0.8, topk=2)
    assert cfg.model.exit_cfg == dict(threshold=0.8, keep_topk=2)
    with pytest.raises(UserError, match="threshold 1.0"):
        _cfg(tiny, "base", tmp=tmp_path, threshold=0.9)
    with pytest.raises(UserError):
        _cfg(tiny, "prune", tmp=tmp_path, threshold=1.5)


def test_batch_is_split_over_processes(tiny, tmp_path: Path) -> None:
    assert _cfg(tiny, tmp=tmp_path, world_size=2).train_dataloader.batch_size == tiny.data.batch_size // 2
    with pytest.raises(UserError, match="evenly"):
        _cfg(tiny, tmp=tmp_path, world_size=3)


def test_amp_and_cuda_settings(tiny, tmp_path: Path) -> None:
    cfg = _cfg(tiny, tmp=tmp_path, amp=True, cuda=True, launcher="pytorch")
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.dtype == "bfloat16"
    assert cfg.env_cfg.dist_cfg.backend == "nccl"
    assert cfg.launcher == "pytorch"


def test_pascal_context_reads_its_image_lists(tmp_path: Path) -> None:
    p = load_preset("segvit-large-pc")
    cfg = _cfg(p, tmp=tmp_path)
    tr, va = cfg.train_dataloader.dataset, cfg.val_dataloader.dataset
    assert tr.type == va.type == p.data.type
    assert tr.ann_file == p.data.train_split.list and va.ann_file == p.data.val_split.list
    assert "metainfo" not in tr  # the real datasets keep mmseg's own class lists
    assert cfg.train_dataloader.batch_size == p.data.batch_size
    assert cfg.param_scheduler[0].end == p.optim.warmup_iters
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys["decode_head"]["lr_mult"] == p.optim.head_lr_mult


# --------------------------------------------------------------------------- export


def test_exported_config_loads_and_builds_through_mmseg(tiny, tmp_path: Path) -> None:
    cfg = _cfg(tiny, "prune", tmp=tmp_path, max_iters=40, threshold=0.85)
    out = write_config(cfg, tmp_path / "exported.py")
    back = Config.fromfile(str(out))
    for key in ("optim_wrapper", "param_scheduler", "train_cfg", "model", "default_hooks", "work_dir"):
        assert back[key] == cfg[key], key
    assert back.train_dataloader.dataset.metainfo.classes == cfg.train_dataloader.dataset.metainfo.classes
    # A fresh interpreter that knows nothing of dtop: custom_imports must be enough for mmseg.
    script = (
        "import sys\n"
        "from mmengine.config import Config\n"
        "cfg = Config.fromfile(sys.argv[1])\n"
        "from mmseg.utils import register_all_modules\n"
        "register_all_modules()\n"
        "from mmseg.registry import MODELS\n"
        "from mmengine.registry import HOOKS\n"
        "m = MODELS.build(cfg.model)\n"
        "h = HOOKS.build(cfg.default_hooks.checkpoint)\n"
        "print(type(m).__name__, type(h).__name__, m.threshold)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["DToPSegmentor", "AtomicCheckpointHook", "0.85"]


def test_write_config_refuses_other_suffixes(tiny, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=".py"):
        write_config(_cfg(tiny, tmp=tmp_path), tmp_path / "cfg.yaml")
    assert not (tmp_path / "cfg.yaml").exists()


def test_config_reads_the_synthetic_dataset(tiny, tmp_path: Path) -> None:
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    from dtop_cli.data.synthetic import make_synthetic

    register_all_modules(init_default_scope=True)
    make_synthetic(tmp_path / "data", n_train=2, n_val=2, size=64)
    cfg = _cfg(tiny, tmp=tmp_path)
    ds = DATASETS.build(cfg.val_dataloader.dataset)
    assert len(ds) == 2 and len(ds.metainfo["classes"]) == tiny.data.num_classes
    labels = ds[0]["data_samples"].gt_sem_seg.data.numpy()
    assert set(np.unique(labels)) <= set(range(tiny.data.num_classes)) | {255}
    assert (labels == 255).any()  # the seams (annotation 0) are ignored after reduce_zero_label


# --------------------------------------------------------------------------- atomic checkpoints


def _toy_runner(work_dir: Path, iters: int, interval: int):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, inputs, data_samples=None, mode="tensor"):
            out = self.lin(torch.stack(inputs))
            return {"loss": out.pow(2).mean()} if mode == "loss" else out

    data = [dict(inputs=torch.full((2,), float(i))) for i in range(8)]
    return Runner(
        model=Toy(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=data, sampler=dict(type="InfiniteSampler", shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type="pseudo_collate")),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        default_hooks=dict(checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=interval,
                                           max_keep_ckpts=2, save_last=True)),
        default_scope="mmengine", experiment_name=f"toy{os.getpid()}{iters}{interval}{work_dir.name}",
    )


def test_atomic_checkpoint_hook_keeps_two_and_points_at_the_last(tmp_path: Path) -> None:
    _toy_runner(tmp_path, iters=6, interval=2).train()
    names = sorted(p.name for p in tmp_path.iterdir()
                   if p.suffix in (".pth", ".part") or p.name.startswith("."))
    assert names == ["iter_4.pth", "iter_6.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == str(tmp_path / "iter_6.pth")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_6.pth"


def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path: Path, monkeypatch) -> None:
    from mmengine.runner import Runner

    real = Runner.save_checkpoint

    def dying(self, out_dir, filename, *a, **kw):
        if "iter_4" in filename:  # write half a file under the temporary name, then die
            Path(out_dir, filename).write_bytes(b"PK\x03\x04half")
            raise KeyboardInterrupt
        return real(self, out_dir, filename, *a, **kw)

    monkeypatch.setattr(Runner, "save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        _toy_runner(tmp_path, iters=6, interval=2).train()
    assert sorted(p.name for p in tmp_path.iterdir() if ".pth" in p.name) == ["iter_2.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == str(tmp_path / "iter_2.pth")
    from dtop_cli.safeload import load_checkpoint

    assert load_checkpoint(tmp_path / "iter_2.pth")["meta"]["iter"] == 2


def test_latest_checkpoint_survives_a_broken_pointer(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for n in (100, 20, 300):
        (tmp_path / f"iter_{n}.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_300.pth"
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_20.pth"))
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_20.pth"
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "gone.pth"))
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_300.pth"


def test_paper_presets_keep_the_papers_augmentation():
    """Random rescale 0.5-2.0 and photometric distortion (method.md) for every paper preset."""
    for name in ("segvit-base-ade", "segvit-large-ade", "segvit-large-pc", "segvit-large-cocostuff"):
        train, _ = pipelines(load_preset(name))
        assert train[1]["ratio_range"] == (0.5, 2.0), name
        assert any(t["type"] == "PhotoMetricDistortion" for t in train), name
