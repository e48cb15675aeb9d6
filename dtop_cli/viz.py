"""Pictures of what the pruning does: label maps, overlays, exit-stage maps, sweep plots.

Everything here is drawing: arrays in, PNG bytes out. Model calls and file discovery live in
`infer.py` and `sweep.py`. Two kinds of picture come out of `dtop infer`:

* machine-checkable ones at the photo's own size (label PNG whose pixel values *are* the
  class ids, overlay, and an exit-stage map of flat colours: one colour per stage, so the
  share of tokens of each stage can be read back from the picture);
* a side-by-side panel (photo | prediction | exit stages over the photo) for people, which is
  where "the easy regions left early" should be obvious at a glance.

Colours of the stages run from cool (left after the first stage: cheap) to warm (went through
every layer: expensive), on a blue-yellow-red scale that stays readable for the common kinds of
colour blindness.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import cv2
import numpy as np

from .presets import Preset, format_threshold, prunes

#: Stage colours (RGB) for the usual three stages: blue = early exit, red = full depth.
_STAGE_RGB_3 = ((49, 130, 189), (253, 192, 80), (215, 48, 39))


# --------------------------------------------------------------------------- colours


def stage_colours(num_stages: int) -> np.ndarray:
    """(S, 3) uint8 RGB colour of each stage, from cool (first exit) to warm (last stage)."""
    if num_stages == 3:
        return np.array(_STAGE_RGB_3, dtype=np.uint8)
    import matplotlib

    cmap = matplotlib.colormaps["RdYlBu_r"]
    pos = np.linspace(0.1, 0.9, num_stages) if num_stages > 1 else np.array([0.9])
    return (np.array([cmap(float(p))[:3] for p in pos]) * 255).round().astype(np.uint8)


def _fallback_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for a dataset without a palette: golden-ratio hues, two brightnesses."""
    hues = (np.arange(num_classes) * 0.618034) % 1.0
    hsv = np.stack([hues * 180, np.full(num_classes, 200), np.where(np.arange(num_classes) % 2, 170, 235)], 1)
    rgb = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]
    return rgb.astype(np.uint8)


def dataset_meta(preset: Preset) -> tuple[list[str], np.ndarray]:
    """Class names and (K, 3) uint8 RGB palette of the preset's dataset.

    The demo data brings its own; the real datasets use mmseg's METAINFO so pictures look like
    the ones people know from mmseg. Never fewer entries than the preset's classes.
    """
    k = preset.data.num_classes
    names: list[str] = []
    palette: np.ndarray | None = None
    if preset.data.dataset == "synthetic":
        from .data.synthetic import CLASSES, PALETTE

        names, palette = list(CLASSES), np.array(PALETTE, dtype=np.uint8)
    else:
        try:
            import mmseg.datasets as mmseg_datasets

            meta = getattr(mmseg_datasets, preset.data.type).METAINFO
            names = list(meta.get("classes", ()))
            if meta.get("palette"):
                palette = np.array(meta["palette"], dtype=np.uint8)
        except (ImportError, AttributeError):
            pass
    if palette is None or len(palette) < k:
        extra = _fallback_palette(k)
        palette = extra if palette is None else np.concatenate([palette, extra[len(palette):]])
    names = (names + [f"class {i}" for i in range(len(names), k)])[:k]
    return names, palette[:k]


def colour_labels(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB; ids outside the palette are drawn black."""
    pal = np.concatenate([palette.astype(np.uint8), np.zeros((1, 3), np.uint8)])
    idx = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return pal[idx]


# --------------------------------------------------------------------------- geometry


def model_input_shape(preset: Preset, height: int, width: int) -> tuple[int, int]:
    """(h, w) the test pipeline resizes a photo to (mmcv's keep-ratio rule, as in `api`)."""
    import mmcv

    new_w, new_h = mmcv.rescale_size((width, height), tuple(preset.data.test_scale))
    return int(new_h), int(new_w)


def token_index(size: int, resized: int, patch: int, tokens: int) -> np.ndarray:
    """Token row (or column) of every photo pixel row (or column): pixel centres mapped into
    the resized model input, then divided by the patch size."""
    centres = (np.arange(size) + 0.5) * (resized / size)
    return np.clip((centres // patch).astype(np.int64), 0, tokens - 1)


def stage_pixels(grid: np.ndarray, height: int, width: int, resized: tuple[int, int],
                 patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token grid (gh, gw) -> per photo pixel: (stage (H, W), token row (H,), token col (W,))."""
    rows = token_index(height, resized[0], patch, grid.shape[0])
    cols = token_index(width, resized[1], patch, grid.shape[1])
    return grid[rows][:, cols], rows, cols


def _edges(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels on the first row/column of a token (the token grid lines)."""
    r = np.zeros(len(rows), bool)
    r[1:] = rows[1:] != rows[:-1]
    c = np.zeros(len(cols), bool)
    c[1:] = cols[1:] != cols[:-1]
    return r[:, None] | c[None, :]


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another class."""
    b = np.zeros(labels.shape, bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


# --------------------------------------------------------------------------- pictures


def label_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """Palette ("P" mode) PNG: pixel values are the class ids, shown in dataset colours.

    Tools that read the file as indices (PIL, mmseg) get the label map back exactly; image
    viewers show the familiar colours.
    """
    from PIL import Image

    if len(palette) > 256 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError("label PNG holds at most 256 classes")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(palette)] = palette
    img.putpalette(flat.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def overlay(bgr: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Photo (BGR) blended with the class colours, class borders darkened: BGR uint8."""
    colours = colour_labels(labels, palette)[..., ::-1].astype(np.float32)
    out = (1 - alpha) * bgr.astype(np.float32) + alpha * colours
    out[_label_boundaries(labels)] *= 0.35
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def stage_legend(num_stages: int, shares: Sequence[float], bounds: Sequence[tuple[int, int]]) -> list[str]:
    """One legend line per stage: where its tokens left the network and their share."""
    lines = []
    for s in range(num_stages):
        end = bounds[s][1] if s < len(bounds) else None
        if end is None:
            where = ""
        elif s == num_stages - 1:
            where = f", all {end} layers"
        else:
            where = f", exit after layer {end}/{bounds[-1][1]}"
        share = f": {100 * shares[s]:.1f}%" if s < len(shares) else ""
        lines.append(f"stage {s + 1}{where}{share}")
    return lines


#: Heading of the stage legends: the shares are of all tokens of the image.
LEGEND_TITLE = "tokens finalised by"


def exit_map(labels: np.ndarray, stage_img: np.ndarray, rows: np.ndarray, cols: np.ndarray,
             legend: Sequence[str], colours: np.ndarray) -> np.ndarray:
    """Flat exit-stage map at the photo's size, with a legend strip below: BGR uint8.

    Every token is one flat colour (its stage), token borders are lighter lines and the
    predicted class borders black, so one sees which objects' tokens left at which stage.
    Flat colours keep the map exact: counting a token's colour gives back its stage.
    """
    H, W = stage_img.shape
    pal = colours[:, ::-1].astype(np.float32)  # BGR
    img = pal[np.clip(stage_img - 1, 0, len(colours) - 1)]
    grid = _edges(rows, cols)
    img[grid] = 0.6 * img[grid] + 0.4 * 255
    img[_label_boundaries(labels)] = 0
    body = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return np.concatenate([body, _legend_strip(W, [LEGEND_TITLE, *legend], colours)], 0)


def _legend_strip(width: int, lines: Sequence[str], colours: np.ndarray) -> np.ndarray:
    """White strip: a heading, then one colour swatch and one line of text per stage (BGR)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    longest = max(lines[1:], key=len) if len(lines) > 1 else lines[0]
    scale = 0.5
    (tw, th), base = cv2.getTextSize(longest, font, scale, 1)
    scale = float(np.clip(scale * (width - 12 - th - base) / max(tw, 1), 0.25, 0.6))  # fit the width
    (_, th), base = cv2.getTextSize("Stage 1", font, scale, 1)
    row = th + base + 5
    strip = np.full((row * len(lines) + 6, width, 3), 255, np.uint8)
    sw = th + base
    for i, text in enumerate(lines):
        y0 = 4 + i * row
        x = 6
        if i > 0:
            c = tuple(int(v) for v in colours[min(i - 1, len(colours) - 1)][::-1])
            cv2.rectangle(strip, (4, y0), (4 + sw, y0 + sw), c, thickness=-1)
            cv2.rectangle(strip, (4, y0), (4 + sw, y0 + sw), (60, 60, 60), thickness=1)
            x = 10 + sw
        cv2.putText(strip, text, (x, y0 + th), font, scale, (20, 20, 20), 1, cv2.LINE_AA)
    return strip


def panel(bgr: np.ndarray, labels: np.ndarray, stage_img: np.ndarray, rows: np.ndarray, cols: np.ndarray,
          palette: np.ndarray, class_names: Sequence[str], legend: Sequence[str], colours: np.ndarray,
          title: str, max_width: int = 420) -> bytes:
    """Side by side: photo | prediction overlay | exit stages over the photo, as PNG bytes.

    The exit panel tints the (greyed) photo with the stage colours and draws the token grid,
    so the cheap early-exit regions stand out against the objects that needed every layer.
    """
    # A bare Figure renders through Agg without touching pyplot's global backend or state.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    H, W = labels.shape
    scale = min(1.0, max_width / W)
    if scale < 1.0:  # big photos are shown smaller: the panel is for looking, not measuring
        size = (max(1, round(W * scale)), max(1, round(H * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        labels = cv2.resize(labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
        stage_img = cv2.resize(stage_img.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
        rows = cv2.resize(rows.astype(np.int32)[:, None], (1, size[1]), interpolation=cv2.INTER_NEAREST)[:, 0]
        cols = cv2.resize(cols.astype(np.int32)[None, :], (size[0], 1), interpolation=cv2.INTER_NEAREST)[0]
        H, W = labels.shape
    rgb = bgr[..., ::-1]
    over = overlay(bgr, labels, palette)[..., ::-1]
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)[..., None]
    tint = colours[np.clip(stage_img - 1, 0, len(colours) - 1)].astype(np.float32)
    ex = 0.35 * grey + 0.65 * tint
    ex[_edges(rows, cols)] = 0.5 * ex[_edges(rows, cols)] + 0.5 * 255
    ex = np.clip(ex + 0.5, 0, 255).astype(np.uint8)

    dpi = 100
    legend_h = 0.17 * (len(legend) + 1) + 0.15
    fig = Figure(figsize=(3 * W / dpi + 0.4, H / dpi + legend_h + 0.45), dpi=dpi)
    axes = fig.subplots(1, 3)
    for ax, im, name in zip(axes, (rgb, over, ex), ("photo", "prediction", "exit stage per token")):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    present = [int(c) for c in np.unique(labels) if 0 <= c < len(palette)]
    present.sort(key=lambda c: -(labels == c).sum())
    cls_handles = [Patch(facecolor=palette[c] / 255, edgecolor="0.3", label=class_names[c])
                   for c in present[:8]]
    stage_handles = [Patch(facecolor=colours[i] / 255, edgecolor="0.3", label=t)
                     for i, t in enumerate(legend)]
    if cls_handles:
        axes[1].legend(handles=cls_handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7,
                       ncol=2, frameon=False, handlelength=1.0, columnspacing=0.8)
    axes[2].legend(handles=stage_handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7,
                   ncol=1, frameon=False, handlelength=1.0, title=LEGEND_TITLE, title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    top = 1 - 0.42 / (H / dpi + legend_h + 0.45)
    bottom = legend_h / (H / dpi + legend_h + 0.45)
    fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.03)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def sweep_plot(rows: Sequence[dict], title: str, paper: object | None = None,
               calibrated: dict | None = None) -> bytes:
    """mIoU against GFLOPs, one labelled point per threshold; the paper's points when given.

    Without a FLOP count (None) the x axis falls back to the threshold itself. Rows with
    per-stage thresholds (a grid) are drawn as points with their best-mIoU-per-cost front
    as the line; only the front is labelled. calibrated: a ``dtop calibrate`` result
    ({threshold, gflops, miou}), marked on the plot.
    """
    # A bare Figure renders through Agg without touching pyplot's global backend or state.
    from matplotlib.figure import Figure

    have_flops = all(r.get("gflops") is not None for r in rows)
    single = all(not isinstance(r["threshold"], (list, tuple)) for r in rows)
    xs = np.array([r["gflops"] if have_flops else np.mean(r["threshold"]) for r in rows], dtype=float)
    ys = np.array([r["miou"] for r in rows], dtype=float)
    order = np.argsort(xs, kind="stable")
    fig = Figure(figsize=(6.0, 4.2), dpi=100)
    ax = fig.subplots()
    if single:
        shown = list(range(len(rows)))
        ax.plot(xs[order], ys[order], "-o", color="#2b6cb0", label="this model, by exit threshold", zorder=3)
    else:
        front, best = [], -np.inf
        for i in order:  # cheapest first: a point is on the front if it beats every cheaper one
            if ys[i] > best:
                front.append(int(i))
                best = ys[i]
        shown = front
        ax.plot(xs, ys, "o", color="#90cdf4", markersize=4, zorder=2, label="per-stage thresholds")
        ax.plot(xs[front], ys[front], "-o", color="#2b6cb0", zorder=3, label="best mIoU for its cost")
    base = [i for i, r in enumerate(rows) if not prunes(r["threshold"])]
    if base:
        ax.plot(xs[base], ys[base], "s", color="#2b6cb0", markersize=8, zorder=4,
                label="threshold 1.0 (no exits)")
    # thresholds that landed on the same point (nothing more exits) share one label
    labels: dict[tuple[float, float], list[str]] = {}
    for i in shown:
        key = (round(float(xs[i]), 9), round(float(ys[i]), 6))
        labels.setdefault(key, []).append(format_threshold(rows[i]["threshold"]))
    for (x, y), names in labels.items():
        ax.annotate("/".join(names), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if calibrated is not None and have_flops:
        ax.plot([calibrated["gflops"]], [calibrated["miou"]], "D", color="#dd6b20", markersize=9, zorder=5,
                label=f"calibrated: {format_threshold(calibrated['threshold'])}")
    if paper is not None and have_flops:
        ax.plot([paper.base_gflops], [paper.base_miou], "s", color="0.35", label="paper: base", zorder=3)
        ax.plot([paper.pruned_gflops], [paper.pruned_miou], "*", color="#c53030", markersize=12,
                label="paper: DToP", zorder=3)
    ax.set_xlabel("GFLOPs per image (average)" if have_flops else "exit threshold (no FLOP counter)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- files


def encode_png(bgr: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", bgr)
    if not ok:  # pragma: no cover - encoder failure
        raise RuntimeError("could not encode PNG")
    return data.tobytes()


def line_plot(data: dict, title: str, ylabel: str, *, xlabel: str = "iteration", log_y: bool = False) -> bytes:
    """One labelled line per series {label: (xs, ys)}, as PNG bytes (`dtop curves`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.subplots()
    for label, (xs, ys) in data.items():
        ax.plot(xs, ys, "-o" if len(xs) < 30 else "-", markersize=3, label=label)
    if log_y and all(y > 0 for _, ys in data.values() for y in ys):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(data) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
