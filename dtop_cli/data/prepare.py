"""`dtop prepare`: from the files the dataset authors publish to the folders the presets read.

One entry point, `prepare_dataset`, that resolves where the inputs come from (``--src`` files
or folders, or ``--download`` of the official URLs), checks digests, and hands over to the
dataset's own converter. A dataset already prepared by dtop is recognised by its marker file
and only re-counted, so running the same command twice costs seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console

from ..errors import UserError
from . import archives as A
from .verify import OFFICIAL_PAIRS, count_pairs, default_workers, layout, read_marker

DATASETS = ("ade20k", "pascal-context", "coco-stuff10k", "synthetic")

# The files as their authors publish them, in the order --sha256 values refer to them.
OFFICIAL_URLS: dict[str, tuple[str, ...]] = {
    "ade20k": ("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",),
    "pascal-context": (
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
        "https://codalabuser.blob.core.windows.net/public/trainval_merged.json",
    ),
    "coco-stuff10k": (
        "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip",
    ),
}


def prepare_dataset(
    name: str,
    srcs: Sequence[Path] = (),
    data_root: Path = Path("data"),
    *,
    download: bool = False,
    sha256: Sequence[str] = (),
    urls: Sequence[str] = (),
    workers: int = 0,
    seed: int = 0,
    force: bool = False,
    console: Optional[Console] = None,
) -> dict[str, Any]:
    """Prepare ``name`` under ``data_root``; returns the summary (also the --json output).

    ``sha256`` digests refer to the inputs in order (the ``--src`` files, or the downloaded
    files in the order of OFFICIAL_URLS / ``urls``). ``urls`` replaces the official URLs, for
    mirrors. ``workers`` 0 means all cores this process may use. ``seed`` and ``force``
    (replace a generated set made with other settings) apply to the synthetic demo only: a
    prepared real dataset is never deleted by dtop.
    """
    t0 = time.time()
    data_root = Path(data_root)
    console = console or A.stderr_console()
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from: {', '.join(DATASETS)})")
    if name == "synthetic":
        if srcs or download or urls or sha256:
            raise UserError("the synthetic dataset is generated: it takes no --src, --download or --sha256")
        from .synthetic import make_synthetic

        res = make_synthetic(data_root, seed=seed, overwrite=force)
        out = dict(res) if isinstance(res, dict) else {"result": res}
        out.setdefault("dataset", "synthetic")
        out.setdefault("seconds", round(time.time() - t0, 2))
        return out

    if force:
        raise UserError(
            "--force only replaces the generated synthetic set; dtop never deletes a prepared "
            "dataset (move it away yourself)"
        )
    workers = workers if workers > 0 else default_workers()
    lay = layout(name)
    target = lay.path(data_root)
    digests = [A.normalize_sha256(h) for h in sha256]

    # A finished dataset: a listing-only check, seconds even for 20k pairs.
    marker = read_marker(target)
    if marker is not None and marker.get("dataset") == name:
        counts = count_pairs(lay, target)
        if counts != marker.get("splits"):
            raise UserError(
                f"{target} was prepared by dtop with {marker.get('splits')} pairs but now has {counts}; "
                f"run `dtop prepare {name} --verify --data-root {data_root}`, "
                f"or move it away and prepare again"
            )
        return _summary(
            name,
            target,
            "already prepared",
            counts,
            marker.get("classes_seen", {}),
            marker.get("sources", []),
            marker.get("warnings", []),
            t0,
        )

    if download and srcs:
        raise UserError("give either --src (files you downloaded) or --download, not both")
    if urls and not download:
        raise UserError("--url only makes sense with --download")
    if download:
        url_list = list(urls) or list(OFFICIAL_URLS[name])
        if len(digests) > len(url_list):
            raise UserError(f"{len(digests)} --sha256 values for {len(url_list)} download(s)")
        paths, sources = [], []
        for i, url in enumerate(url_list):
            path, digest = A.download(
                url,
                data_root / "downloads",
                expected_sha256=digests[i] if i < len(digests) else None,
                console=console,
            )
            paths.append(path)
            sources.append({"path": str(path), "url": url, "sha256": digest})
    else:
        if not srcs:
            raise UserError(
                f"{name} needs --src with the file(s) from {' and '.join(OFFICIAL_URLS[name])}, "
                f"or --download to fetch them"
            )
        paths = [Path(s) for s in srcs]
        for p in paths:
            if not p.exists():
                raise UserError(f"file not found: {p}")
        if len(digests) > len(paths):
            raise UserError(f"{len(digests)} --sha256 values for {len(paths)} --src input(s)")
        sources = []
        for i, p in enumerate(paths):
            entry: dict[str, Any] = {"path": str(p)}
            if i < len(digests):
                if not p.is_file():
                    raise UserError(f"--sha256 given for {p}, which is a folder, not a file")
                seen = A.sha256_file(p, console)
                A.check_sha256(p, digests[i], seen)
                entry["sha256"] = seen
            sources.append(entry)

    if name == "ade20k":
        from .prepare_ade import prepare_ade as convert
    elif name == "pascal-context":
        from .prepare_pascal_context import prepare_pascal_context as convert
    else:
        from .prepare_coco_stuff import prepare_coco_stuff as convert
    res = convert(paths, target, lay, workers=workers, console=console, sources=sources)
    return _summary(
        name, target, "prepared", res["splits"], res["classes_seen"], sources, res.get("warnings", []), t0
    )


def _summary(
    name: str, root: Path, status: str, counts: dict, seen: dict, sources: list, warnings: list, t0: float
) -> dict[str, Any]:
    official = OFFICIAL_PAIRS[name]
    all_seen: set[int] = set()
    for ids in seen.values():
        all_seen.update(ids)
    return {
        "dataset": name,
        "root": str(root),
        "status": status,
        "splits": {
            k: {"pairs": int(n), "official": official.get(k), "classes_seen": len(seen.get(k, []))}
            for k, n in counts.items()
        },
        "classes_seen": len(all_seen),
        "num_classes": layout(name).num_classes,
        "sources": sources,
        "warnings": warnings,
        "seconds": round(time.time() - t0, 2),
    }
