"""YAML presets: the one source of truth for every number of a run.

A preset is read from ``presets/<name>.yaml`` (or any path), overridden with ``--set
dotted.key=value`` and validated against the dataclasses below. Validation is strict on
purpose: a typo in a key silently ignored would train the wrong model for days. Every
problem is reported as one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError


def _preset_dir() -> Path:
    """The shipped presets: inside the installed package (a wheel maps the repository's
    top-level ``presets/`` to ``dtop_cli/preset_files``), else the source checkout's folder
    (editable installs and running from a clone)."""
    here = Path(__file__).resolve().parent
    packaged = here / "preset_files"
    return packaged if packaged.is_dir() else here.parent / "presets"


PRESET_DIR = _preset_dir()


class PresetError(UserError):
    """A preset file or override that does not match the schema."""


# --------------------------------------------------------------------------- schema
# Each field's metadata may carry: length (exact list length), check (callable, text).


def _len(n: int) -> dict:
    return {"length": n}


#: Stage heads the segmentor can run (dtop_cli/model/build.py maps each to its module):
#: atm (SegViT), setr-up (mmseg SETRUPHead; num_layers = its conv blocks), mask-transformer
#: (mmseg SegmenterMaskTransformerHead), linear (LayerNorm + Linear per token).
HEAD_TYPES = ("atm", "setr-up", "mask-transformer", "linear")


@dataclass(frozen=True)
class HeadCfg:
    channels: int
    num_heads: int
    num_layers: int
    dropout: float
    type: str = field(default="atm", metadata={"check": (lambda v: v in HEAD_TYPES, " or ".join(HEAD_TYPES))})
    #: setr-up only: the x`up_scale` bilinear upsample after each conv block (mmseg's Upsample)
    up_scale: int = 4


@dataclass(frozen=True)
class ModelCfg:
    backbone: str
    embed_dims: int
    num_layers: int
    num_heads: int
    patch_size: int
    mlp_ratio: float
    drop_path_rate: float
    #: 0-based layers after which a head reads the tokens; any number of stages >= 1
    stage_ends: list[int]
    head: HeadCfg
    pretrained: Optional[str]
    #: the auxiliary (stage-end) heads when they differ from the decode head; null = same as head
    aux_head: Optional[HeadCfg] = None
    #: True when the model files this preset loads have no auxiliary heads (they are added by
    #: dtop and trained with `dtop train --init`): their keys are reported as new, not missing
    aux_heads_added: bool = False
    #: mmseg VisionTransformer options: the class token goes through every layer (never
    #: exits), the position table's resize mode, the final LayerNorm (`ln1`) on the last
    #: layer's output, the bias of the patch convolution, the layer norms' epsilon
    with_cls_token: bool = False
    interpolate_mode: str = field(default="bicubic", metadata={
        "check": (lambda v: v in ("bicubic", "bilinear"), "'bicubic' or 'bilinear'")})
    final_norm: bool = False
    patch_bias: bool = True


def valid_threshold(value: float) -> bool:
    """An exit threshold is a token's best class score to beat: in (0, 1], 1.0 = no exit."""
    return 0.0 < value <= 1.0


#: An exit threshold: one for every non-final stage, or one per non-final stage (in order).
Threshold = Union[float, tuple[float, ...]]


def check_threshold(value: Any, what: str = "--thresh", stages: Optional[int] = None) -> Threshold:
    """The one check of an exit threshold given on the command line, in a preset or through
    the API: ``0.9``, ``"0.97,0.9"`` or ``[0.97, 0.9]``. Returns a float, or a tuple with one
    value per non-final stage. stages: the number of non-final stages, when known (a tuple
    of another length is refused; a one-element list is the plain number)."""
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(",")]
        value = parts[0] if len(parts) == 1 else parts
    if isinstance(value, (list, tuple)):
        vals = tuple(_one_threshold(v, what) for v in value)
        if not vals:
            raise UserError(f"{what}: give a number in (0, 1] or one per non-final stage, e.g. 0.97,0.9")
        if len(vals) == 1:
            return vals[0]
        if stages is not None and len(vals) != stages:
            raise UserError(f"{what}: {len(vals)} per-stage thresholds for a model with {stages} non-final "
                            f"stage(s) (give one number, or exactly {stages})")
        return vals
    return _one_threshold(value, what)


def _one_threshold(value: Any, what: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in (0, 1] (got {value!r})") from None
    if not valid_threshold(v):
        raise UserError(f"{what} must be in (0, 1] (got {value})")
    return v


def stage_thresholds(threshold: Threshold, stages: int) -> tuple[float, ...]:
    """The threshold of each of the ``stages`` non-final stages."""
    if isinstance(threshold, (list, tuple)):
        if len(threshold) != stages:
            raise UserError(f"{len(threshold)} per-stage thresholds for a model with {stages} non-final stage(s)")
        return tuple(float(t) for t in threshold)
    return (float(threshold),) * stages


def from_stage_values(values: Sequence[float]) -> Threshold:
    """One threshold per non-final stage in the model's form: the plain number when every
    stage has the same one (so ``0.9,0.9`` and ``0.9`` are one setting, written once)."""
    vals = tuple(float(v) for v in values)
    return vals[0] if len(set(vals)) == 1 else vals


def heads_that_run(threshold: Threshold, stages: int) -> list[bool]:
    """Per non-final stage: whether inference runs its head (it can retire tokens only when
    its threshold is below 1; at 1.0 the head is skipped)."""
    return [t < 1.0 for t in stage_thresholds(threshold, stages)]


def threshold_value(threshold: Threshold) -> Union[float, list[float]]:
    """The JSON/YAML form: a number, or a list with one number per non-final stage."""
    return [float(t) for t in threshold] if isinstance(threshold, (list, tuple)) else float(threshold)


def format_threshold(threshold: Threshold) -> str:
    """``0.9`` or ``0.97,0.9``: the form ``--thresh`` takes back."""
    if isinstance(threshold, (list, tuple)):
        return ",".join(f"{float(t):g}" for t in threshold)
    return f"{float(threshold):g}"


def prunes(threshold: Threshold) -> bool:
    """Whether any stage can retire tokens (some threshold below 1)."""
    vals = threshold if isinstance(threshold, (list, tuple)) else (threshold,)
    return min(float(t) for t in vals) < 1.0


def _preset_threshold(value: Any, key: str, where: str) -> Union[float, list[float]]:
    try:
        return threshold_value(check_threshold(value, key))
    except UserError:
        raise PresetError(f"{where}: key '{key}': expected a number in (0, 1] or a list of them (one per "
                          f"non-final stage), got {value!r}") from None


@dataclass(frozen=True)
class ExitCfg:
    #: one number, or a list with one per non-final stage (see :func:`check_threshold`)
    threshold: Union[float, list[float]] = field(metadata={"convert": _preset_threshold})
    keep_topk: int = field(metadata={"check": (lambda v: v >= 0, "an integer >= 0")})


@dataclass(frozen=True)
class LossCfg:
    cls_weight: float
    absent_weight: float
    focal_weight: float
    dice_weight: float
    focal_alpha: float
    focal_gamma: float
    #: How ignored pixels (label 255) enter the focal and dice terms: "negative" (a negative
    #: of every present class, as the public DToP/SegViT code trains) or "excluded".
    ignored_pixels: str = field(default="negative", metadata={
        "check": (lambda v: v in ("negative", "excluded"), "'negative' or 'excluded'")})
    #: weight of each auxiliary head's loss for per-pixel heads (mmseg's SETR: 0.4); the ATM
    #: terms above apply to ATM heads only
    aux_weight: float = 1.0
    #: ATM mask terms on every n-th label pixel in each direction (1: every pixel, as the
    #: paper). The CPU demo uses 2: a quarter of the per-pixel work of its training steps.
    label_stride: int = field(default=1, metadata={"check": (lambda v: 1 <= v <= 16, "an integer in 1..16")})


@dataclass(frozen=True)
class SplitCfg:
    img: str
    ann: str
    list: Optional[str] = None


@dataclass(frozen=True)
class DataCfg:
    dataset: str
    type: str
    root: str
    train_split: SplitCfg
    val_split: SplitCfg
    num_classes: int
    reduce_zero_label: bool
    crop: list[int] = field(metadata=_len(2))
    train_scale: list[int] = field(metadata=_len(2))
    test_scale: list[int] = field(metadata=_len(2))
    test_mode: str = field(metadata={"check": (lambda v: v in ("slide", "whole"), "'slide' or 'whole'")})
    test_stride: list[int] = field(metadata=_len(2))
    cat_max_ratio: float
    resize_ratio: list[float] = field(metadata=_len(2))
    photometric: bool
    mean: list[float] = field(metadata=_len(3))
    std: list[float] = field(metadata=_len(3))
    batch_size: int
    num_workers: int
    val_images: int


@dataclass(frozen=True)
class OptimCfg:
    lr: float
    betas: list[float] = field(metadata=_len(2))
    weight_decay: float
    head_lr_mult: float
    warmup_iters: int
    warmup_ratio: float
    poly_power: float


@dataclass(frozen=True)
class PhaseCfg:
    iters: int
    poly_iters: int
    #: model parts (parameter-name prefixes, e.g. backbone, decode_head) that this phase does
    #: not train: no gradients, and kept in eval mode (BatchNorm statistics, dropout)
    frozen: Optional[list[str]] = None


@dataclass(frozen=True)
class ScheduleCfg:
    base: PhaseCfg
    prune: PhaseCfg
    val_interval: int
    checkpoint_interval: int


@dataclass(frozen=True)
class PaperCfg:
    base_miou: float
    base_gflops: float
    pruned_miou: float
    pruned_gflops: float


@dataclass(frozen=True)
class ReferenceCfg:
    """The published accuracy of the model file a preset describes (not a DToP result)."""

    miou: float
    source: str


@dataclass(frozen=True)
class PretrainCfg:
    """Backbone pretraining by per-token classification on the training split.

    Only for presets without real pretrained weights (the CPU demo): it stands in for the
    ImageNet pretraining every real preset's backbone has (see ``dtop_cli.pretrain``).
    """

    iters: int = field(metadata={"check": (lambda v: v >= 1, "an integer >= 1")})
    lr: float = field(metadata={"check": (lambda v: v > 0, "a number > 0")})


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelCfg
    exit: ExitCfg
    loss: LossCfg
    data: DataCfg
    optim: OptimCfg
    schedule: ScheduleCfg
    paper: Optional[PaperCfg]
    pretrain: Optional[PretrainCfg] = None
    reference: Optional[ReferenceCfg] = None
    source: str = field(default="", metadata={"internal": True})

    @property
    def num_stages(self) -> int:
        return len(self.model.stage_ends)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the YAML content), without bookkeeping fields."""
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def to_yaml(self) -> str:
        """The resolved preset as YAML text (overrides applied): what a checkpoint records, so
        that it can be rebuilt exactly even after the file it came from is gone."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) > 1:
            return " or ".join(_type_name(a) for a in args)
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


#: A plain decimal number, exponent allowed (not nan/inf).
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _convert(value: Any, tp: Any, key: str, meta: typing.Mapping, where: str) -> Any:
    def bad(expected: str | None = None) -> PresetError:
        exp = expected or _type_name(tp)
        return PresetError(f"{where}: key '{key}': expected {exp}, got {value!r}")

    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return _convert(value, inner, key, meta, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, where, prefix=key + ".")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        if "length" in meta and len(value) != meta["length"]:
            raise bad(f"{_type_name(tp)} of length {meta['length']}")
        out = [_convert(v, inner, f"{key}[{i}]", {}, where) for i, v in enumerate(value)]
    elif tp is bool:
        if not isinstance(value, bool):
            raise bad()
        out = value
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        out = value
    elif tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads exponents without a dot, `5e-5`, as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        out = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad()
        out = value
    else:  # pragma: no cover - schema bug
        raise TypeError(tp)
    check = meta.get("check")
    if check is not None and not check[0](out):
        raise bad(check[1])
    return out


def _build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for k in data:
        if k not in fields:
            raise PresetError(
                f"{where}: unknown key '{prefix}{k}' (expected one of: {', '.join(fields)})"
            )
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is not dataclasses.MISSING:
                continue
            raise PresetError(f"{where}: missing key '{key}' ({_type_name(hints[name])})")
        convert = f.metadata.get("convert")
        kwargs[name] = (convert(data[name], key, where) if convert is not None
                        else _convert(data[name], hints[name], key, f.metadata, where))
    return cls(**kwargs)


def _semantic_checks(p: Preset, where: str) -> None:
    """Cross-field rules the types alone cannot say."""
    m = p.model
    ends = m.stage_ends
    if not ends or sorted(ends) != ends or len(set(ends)) != len(ends) or ends[-1] != m.num_layers - 1 \
            or ends[0] < 0:
        raise PresetError(
            f"{where}: key 'model.stage_ends': expected strictly increasing layer indices "
            f"ending at num_layers-1 = {m.num_layers - 1}, got {ends}"
        )
    t = p.exit.threshold
    if isinstance(t, list) and len(t) != len(ends) - 1:
        raise PresetError(f"{where}: key 'exit.threshold': expected one number or {len(ends) - 1} (one per "
                          f"non-final stage), got {len(t)}: {t}")
    if m.embed_dims % m.num_heads:
        raise PresetError(f"{where}: key 'model.num_heads': expected a divisor of embed_dims {m.embed_dims}")
    for cfg in (m.head, m.aux_head):
        if cfg is not None and cfg.type in ("atm", "mask-transformer") and cfg.channels % cfg.num_heads:
            raise PresetError(f"{where}: key 'model.head.num_heads': expected a divisor of head.channels {cfg.channels}")
    if m.head.type == "atm" and m.head.channels % m.head.num_heads:
        raise PresetError(f"{where}: key 'model.head.num_heads': expected a divisor of head.channels {m.head.channels}")
    for k in ("crop",):
        for v in getattr(p.data, k):
            if v % m.patch_size:
                raise PresetError(f"{where}: key 'data.{k}': expected multiples of patch_size {m.patch_size}, got {getattr(p.data, k)}")


# --------------------------------------------------------------------------- loading


def available() -> list[str]:
    """Names of the presets shipped in presets/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        if not p.is_file():
            raise PresetError(f"preset file not found: {name_or_path}")
        return p
    cand = PRESET_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        raise PresetError(f"unknown preset '{name_or_path}' (available: {', '.join(available())}; or give a path to a .yaml file)")
    return cand


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML so 0.9, true, [1,2] work)."""
    if "=" not in text:
        raise PresetError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise PresetError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """Apply ``--set`` overrides to the raw mapping (validation happens afterwards)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                raise PresetError(f"{where}: --set {text}: unknown key '{'.'.join(parts[: i + 1])}'")
            node = nxt
        if parts[-1] not in node:
            raise PresetError(f"{where}: --set {text}: unknown key '{'.'.join(parts)}'")
        node[parts[-1]] = value
    return data


def load_preset(name_or_path: str, overrides: Optional[list[str]] = None) -> Preset:
    """Read, override and validate a preset; raises PresetError with one clear line."""
    path = resolve_path(name_or_path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PresetError(f"{path}: cannot read ({e.strerror})") from None
    return preset_from_text(text, str(path), overrides)


def preset_from_text(text: str, where: str, overrides: Optional[list[str]] = None) -> Preset:
    """Parse, override and validate preset YAML text (a file's, or one a checkpoint recorded).

    ``where`` names the origin in error messages and becomes the preset's ``source``.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise PresetError(f"{where}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{where}: expected a mapping at the top level")
    if overrides:
        data = apply_overrides(data, overrides, where)
    preset = _build(Preset, data, where)
    _semantic_checks(preset, where)
    return dataclasses.replace(preset, source=where)


def replace(preset: Preset, **changes: Any) -> Preset:
    """Return a copy with dotted-key changes, e.g. ``replace(p, **{"exit.threshold": 1.0})``."""
    data = preset.to_dict()
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in changes.items()]
    data = apply_overrides(data, overrides, preset.source or preset.name)
    out = _build(Preset, data, preset.source or preset.name)
    _semantic_checks(out, preset.source or preset.name)
    return dataclasses.replace(out, source=preset.source)


def summary(p: Preset) -> dict[str, Any]:
    """The `dtop presets --json` entry of one preset (keys are a contract, interface.md)."""
    return {
        "name": p.name,
        "backbone": p.model.backbone,
        "dataset": p.data.dataset,
        "crop": list(p.data.crop),
        "thresh": p.exit.threshold,
        "keep_topk": p.exit.keep_topk,
        "stage_ends": list(p.model.stage_ends),
        "paper": dataclasses.asdict(p.paper) if p.paper else None,
        "reference": dataclasses.asdict(p.reference) if p.reference else None,
    }
