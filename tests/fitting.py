"""A tiny model fitted in a test: a few AdamW steps of the real training loss on the synthetic
training split, nothing exiting (threshold 1.0), so every head is supervised. Tests that need
token confidences spread over (0, 1) start from it; each writes its own checkpoint meta."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from dtop_cli.presets import Preset, load_preset


def fit_tiny(preset_path: Path, data: Path, steps: int) -> tuple[torch.nn.Module, Preset]:
    """(fitted model, its preset): `steps` AdamW steps on batches of 4 training images of the
    synthetic dataset folder ``data`` (seed 0 for the weights and the batch order)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    from dtop_cli.model.build import build_model

    p = load_preset(str(preset_path))
    torch.manual_seed(0)
    model = build_model(p, threshold=1.0).train()
    imgs, labels = [], []
    for f in sorted((data / "images" / "training").glob("*.jpg")):
        imgs.append(torch.from_numpy(cv2.imread(str(f))).permute(2, 0, 1).contiguous())
        ann = cv2.imread(str(data / "annotations" / "training" / f"{f.stem}.png"), cv2.IMREAD_UNCHANGED)
        lab = ann.astype(np.int64) - 1  # reduce_zero_label: 0 (seams) -> 255, 1..8 -> 0..7
        lab[lab < 0] = 255
        labels.append(torch.from_numpy(lab))
    opt = torch.optim.AdamW(model.parameters(), lr=p.optim.lr, weight_decay=p.optim.weight_decay)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(imgs), generator=g)[:4].tolist()
        samples = []
        for i in idx:
            ds = SegDataSample()
            ds.gt_sem_seg = PixelData(data=labels[i][None])
            samples.append(ds)
        batch = model.data_preprocessor({"inputs": [imgs[i] for i in idx], "data_samples": samples},
                                        training=True)
        loss = sum(model.loss(batch["inputs"], batch["data_samples"]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, p
