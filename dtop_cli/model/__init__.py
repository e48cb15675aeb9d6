"""DToP model modules, registered in mmseg's MODELS registry on import.

A plain mmseg config can use ``DToPSegmentor``, ``DToPViT``, ``ATMHead`` and ``ATMLoss`` after
``custom_imports=dict(imports=['dtop_cli.model'])``.
"""

from mmseg.registry import MODELS

from .atm_head import ATMHead
from .exits import DToPOutput
from .loss import ATMLoss
from .pixel_heads import LinearStageHead, MaskTransformerStageHead, SETRUpStageHead
from .segmentor import DToPSegmentor
from .vit import DToPViT

for _cls in (DToPViT, ATMHead, ATMLoss, SETRUpStageHead, MaskTransformerStageHead, LinearStageHead):
    if MODELS.get(_cls.__name__) is None:
        MODELS.register_module(module=_cls)

__all__ = ["ATMHead", "ATMLoss", "DToPOutput", "DToPSegmentor", "DToPViT", "LinearStageHead",
           "MaskTransformerStageHead", "SETRUpStageHead"]
