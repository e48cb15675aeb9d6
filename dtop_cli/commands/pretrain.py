"""A short backbone pretraining for the embedded demo, standing in for ImageNet pretraining.

Every real preset starts its backbone from ImageNet-pretrained ViT weights; SegViT's ATM heads
(and so DToP) are built on that: their masks are similarities between class queries and token
features, which only carry a useful training signal once the tokens already describe what
they show. The demo's tiny ViT has no such weights, and trained from scratch with the ATM
loss it barely learns in the demo's time budget. So the demo first gives its backbone the
kind of start the real presets get: about a thousand iterations of per-token classification
on the synthetic *training* split, saved as an mmseg-format backbone state dict
(``layers.0.ln1.weight``, ``pos_embed``, ...) that the base run loads through ``--pretrained``
exactly like a real one.

There is one linear classifier per stage end (cross-entropy on the upsampled logits of each,
summed), the same deep supervision the staged model gets from its auxiliary heads: the early
layers learn what a single patch shows, and the later ones what only context tells (the twin
classes). The classifiers are thrown away; only the backbone is kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import UserError
from ..fsutil import atomic_save
from ..presets import Preset


def _load_split(root: Path, img_dir: str, ann_dir: str, reduce_zero_label: bool) -> tuple[Any, Any]:
    """All images (N, H, W, 3 RGB uint8) and labels (N, H, W int64, 255 = ignore) of a split."""
    import cv2
    import numpy as np

    imgs = sorted((root / img_dir).glob("*.jpg"))
    if not imgs:
        raise UserError(f"no training images in {root / img_dir}")
    xs, ys = [], []
    for f in imgs:
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        ann = cv2.imread(str(root / ann_dir / (f.stem + ".png")), cv2.IMREAD_GRAYSCALE)
        if img is None or ann is None or img.shape[:2] != ann.shape:
            raise UserError(f"unreadable or mismatched image/annotation pair: {f.name}")
        xs.append(img[:, :, ::-1])
        lab = ann.astype(np.int64)
        if reduce_zero_label:
            lab = np.where(lab == 0, 255, lab - 1)
        ys.append(lab)
    return np.stack(xs), np.stack(ys)


def pretrain_backbone(
    preset: Preset,
    data_root: Union[str, Path],
    out_path: Union[str, Path],
    *,
    iters: int,
    lr: float = 1e-3,
    batch_size: Optional[int] = None,
    seed: int = 0,
    console: Any = None,
    meta: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Pretrain ``preset``'s backbone by per-token classification and save its weights.

    Runs on the training split only (the validation set is never seen). Writes
    ``out_path`` atomically (mmseg layout, no ``backbone.`` prefix) and returns a summary
    with the final training pixel accuracy of the last stage's classifier, which says
    whether the backbone learned. ``meta`` is added to the file's ``meta.dtop`` record.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..data.mmseg import dataset_root
    from ..model.build import model_config
    from ..model.loss import upsample_bilinear
    from ..model.vit import DToPViT

    if iters < 1:
        raise UserError(f"pretraining needs at least one iteration (got {iters})")
    t0 = time.perf_counter()
    d, m = preset.data, preset.model
    root = dataset_root(preset, data_root)
    X, Y = _load_split(root, d.train_split.img, d.train_split.ann, d.reduce_zero_label)
    mean = torch.tensor(d.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(d.std, dtype=torch.float32).view(1, 3, 1, 1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    # the very backbone the segmentor builds (one source for its arguments)
    backbone_cfg = {k: v for k, v in model_config(preset)["backbone"].items() if k != "type"}
    backbone = DToPViT(**backbone_cfg)
    bounds = backbone.stage_bounds()
    classifiers = torch.nn.ModuleList(torch.nn.Linear(m.embed_dims, d.num_classes) for _ in bounds)
    params = list(backbone.parameters()) + list(classifiers.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, iters // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (1.0 - min(i, iters - 1) / iters) ** 0.9)
    bs = batch_size or d.batch_size
    ch, cw = d.crop
    n, H, W = Y.shape
    backbone.train()
    acc = 0.0
    for it in range(iters):
        idx = rng.integers(0, n, bs)
        y0 = int(rng.integers(0, max(1, H - ch + 1)))
        x0 = int(rng.integers(0, max(1, W - cw + 1)))
        img = torch.from_numpy(np.ascontiguousarray(X[idx, y0:y0 + ch, x0:x0 + cw])).permute(0, 3, 1, 2)
        img = (img.float() - mean) / std
        lab = torch.from_numpy(np.ascontiguousarray(Y[idx, y0:y0 + ch, x0:x0 + cw]))
        if rng.random() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        tokens, (gh, gw) = backbone.embed(img)
        loss = img.new_zeros(())
        for (start, end), classifier in zip(bounds, classifiers):
            tokens = backbone.forward_layers(tokens, start, end)
            logits = classifier(tokens).transpose(1, 2).reshape(len(idx), -1, gh, gw)
            logits = upsample_bilinear(logits, lab.shape[-2:])
            loss = loss + F.cross_entropy(logits, lab, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % 10 == 0 or it == iters - 1:  # a full-resolution argmax costs a tenth of a step
            with torch.no_grad():
                valid = lab != 255
                a = float(((logits.argmax(1) == lab) & valid).sum()) / max(1, int(valid.sum()))
            acc = a if it == 0 else 0.7 * acc + 0.3 * a
        if console is not None and (it % 50 == 0 or it == iters - 1):
            console.print(f"  pretrain {it + 1}/{iters}  loss {float(loss.detach()):.3f}  pixel acc {acc:.3f}")
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    out = Path(out_path)
    info = {"pretrain": "per-token classification", "preset": preset.name, "iters": iters, "lr": lr,
            "batch_size": bs, "seed": seed, "train_images": int(n), "train_pixel_acc": round(acc, 4),
            **(meta or {})}
    payload = {"state_dict": state, "meta": {"dtop": info}}
    atomic_save(out, lambda f: torch.save(payload, f))
    return {"path": str(out), "iters": iters, "train_pixel_acc": round(acc, 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def make_demo_weights(out_path: Union[str, Path], data_root: Union[str, Path], *, iters: Optional[int] = None,
                      n_train: Optional[int] = None, console: Any = None) -> dict[str, Any]:
    """The demo backbone shipped in ``presets/weights`` (what ``scripts/make_demo_weights.py`` runs).

    Why shipped: pretraining is the demo's stand-in for the ImageNet weights every real
    preset downloads, and it took a third of ``dtop quickstart``; like a real preset, the demo
    now starts from a file. This function makes that file from nothing but the repository:
    the synthetic training split (seed 0, generator version recorded) and the preset's
    ``pretrain`` settings, seed 0, so anyone can rebuild it (bit for bit on the same CPU
    kind and torch version; other CPUs differ in float rounding only).
    """
    from ..data.synthetic import GENERATOR_VERSION, make_synthetic
    from ..presets import load_preset

    preset = load_preset("tiny-synthetic")
    if preset.pretrain is None:  # pragma: no cover - the shipped preset has one
        raise UserError("preset 'tiny-synthetic' has no pretrain section")
    kw: dict[str, Any] = {"seed": 0, "n_val": 1}
    if n_train is not None:
        kw["n_train"] = n_train
    data = make_synthetic(Path(data_root), **kw)
    import torch

    meta = {"made_by": "scripts/make_demo_weights.py", "generator_version": GENERATOR_VERSION,
            "data_seed": 0, "torch": str(torch.__version__)}
    return pretrain_backbone(preset, data_root, out_path, iters=iters or preset.pretrain.iters,
                             lr=preset.pretrain.lr, seed=0, console=console,
                             meta={**meta, "train_images": data["train"]})
