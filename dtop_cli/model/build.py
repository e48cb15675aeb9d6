"""Preset -> mmseg model config: the one place where preset numbers become module arguments."""

from __future__ import annotations

from typing import Optional, Sequence

from ..presets import Preset, Threshold, threshold_value


def head_config(preset: Preset, aux: bool = False) -> dict:
    """Config of one stage head: the decode head, or (aux) one auxiliary head. The stages
    share the architecture, not the weights; ``model.aux_head`` (when set) describes the
    auxiliary ones. Per-pixel heads train with mmseg's cross-entropy, auxiliary heads
    weighted by ``loss.aux_weight``."""
    m, lo = preset.model, preset.loss
    h = m.aux_head if aux and m.aux_head is not None else m.head
    K = preset.data.num_classes
    weight = lo.aux_weight if aux else 1.0
    if h.type == "setr-up":
        return dict(type="SETRUpStageHead", in_channels=m.embed_dims, channels=h.channels, num_classes=K,
                    num_convs=h.num_layers, up_scale=h.up_scale, dropout=h.dropout, loss_weight=weight)
    if h.type == "mask-transformer":
        return dict(type="MaskTransformerStageHead", in_channels=m.embed_dims, channels=h.channels,
                    num_classes=K, num_heads=h.num_heads, num_layers=h.num_layers, mlp_ratio=m.mlp_ratio,
                    drop_path_rate=m.drop_path_rate, dropout=h.dropout, loss_weight=weight)
    if h.type == "linear":
        return dict(type="LinearStageHead", in_channels=m.embed_dims, num_classes=K, loss_weight=weight)
    return dict(
        type="ATMHead",
        in_channels=m.embed_dims,
        channels=h.channels,
        num_classes=preset.data.num_classes,
        num_heads=h.num_heads,
        num_layers=h.num_layers,
        dropout=h.dropout,
        loss_decode=dict(
            type="ATMLoss",
            num_classes=preset.data.num_classes,
            cls_weight=lo.cls_weight,
            absent_weight=lo.absent_weight,
            focal_weight=lo.focal_weight,
            dice_weight=lo.dice_weight,
            focal_alpha=lo.focal_alpha,
            focal_gamma=lo.focal_gamma,
            ignore_index=255,
            ignored_pixels=lo.ignored_pixels,
            label_stride=lo.label_stride,
        ),
    )


def test_config(preset: Preset) -> dict:
    d = preset.data
    if d.test_mode == "slide":
        return dict(mode="slide", crop_size=tuple(d.crop), stride=tuple(d.test_stride))
    return dict(mode="whole")


def model_config(preset: Preset, threshold: Optional[Threshold] = None, pretrained: Optional[str] = None,
                 frozen: Sequence[str] = ()) -> dict:
    """mmseg config dict of the DToP segmentor described by `preset`.

    threshold: exit threshold of the built model, one number or one per non-final stage
    (default: the preset's). pretrained: path of mmseg-format ViT weights loaded into the
    backbone by `init_weights`. frozen: parts the run does not train (a phase's
    ``schedule.<phase>.frozen``).
    """
    m, d = preset.model, preset.data
    return dict(
        type="DToPSegmentor",
        data_preprocessor=dict(
            type="SegDataPreProcessor",
            mean=list(d.mean),
            std=list(d.std),
            bgr_to_rgb=True,
            pad_val=0,
            seg_pad_val=255,
            size=tuple(d.crop),
        ),
        backbone=dict(
            type="DToPViT",
            img_size=tuple(d.crop),
            patch_size=m.patch_size,
            embed_dims=m.embed_dims,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio,
            drop_path_rate=m.drop_path_rate,
            stage_ends=list(m.stage_ends),
            with_cls_token=m.with_cls_token,
            interpolate_mode=m.interpolate_mode,
            final_norm=m.final_norm,
            patch_bias=m.patch_bias,
            pretrained=pretrained,
        ),
        decode_head=head_config(preset),
        auxiliary_head=[head_config(preset, aux=True) for _ in m.stage_ends[:-1]],
        exit_cfg=dict(threshold=threshold_value(preset.exit.threshold if threshold is None else threshold),
                      keep_topk=preset.exit.keep_topk),
        frozen=list(frozen),
        added_keys=["auxiliary_head"] if m.aux_heads_added else [],
        train_cfg=dict(),
        test_cfg=test_config(preset),
    )


def build_model(preset: Preset, threshold: Optional[Threshold] = None, pretrained: Optional[str] = None):
    """Build the segmentor through mmseg's registry (registers dtop's modules first)."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    from . import DToPSegmentor  # noqa: F401  (registration)

    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(model_config(preset, threshold=threshold, pretrained=pretrained))
