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

from ..console import stderr_console
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
    download: Optional[bool] = None,
    sha256: Sequence[str] = (),
    urls: Sequence[str] = (),
    workers: int = 0,
    seed: int = 0,
    force: bool = False,
    console: Optional[Console] = None,
) -> dict[str, Any]:
    """Prepare ``name`` under ``data_root``; returns the summary (also the --json output).

    Where the official files come from: ``srcs`` (``--src``) if given; else the files already
    on disk under their official names (the current directory, then ``DATA_ROOT/downloads``);
    else a download of the official URLs into ``DATA_ROOT/downloads``. ``download`` True
    (``--download``) always fetches (resuming a partial file, reusing a complete one); False
    (``--no-download``) never touches the network and names what is missing instead.

    ``sha256`` digests refer to the inputs in order (the ``--src`` files, or the official
    files in the order of OFFICIAL_URLS / ``urls``). ``urls`` replaces the official URLs, for
    mirrors. ``workers`` 0 means all cores this process may use. ``seed`` and ``force``
    (replace a generated set made with other settings) apply to the synthetic demo only: a
    prepared real dataset is never deleted by dtop.
    """
    t0 = time.time()
    data_root = Path(data_root)
    console = console or stderr_console()
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
    if urls and srcs:
        raise UserError("--url names where to download from; it does not combine with --src")
    if download is False and urls:
        raise UserError("--url names where to download from; it does not combine with --no-download")
    if srcs:
        paths, sources = _local_sources([Path(s) for s in srcs], digests, console)
    else:
        paths, sources = _official_sources(name, data_root, list(urls) or list(OFFICIAL_URLS[name]), digests,
                                           download, console)

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


def _local_sources(paths: list[Path], digests: list[str], console: Console) -> tuple[list[Path], list[dict]]:
    """``--src`` inputs: they must exist; digests given for them are checked."""
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
    return paths, sources


def official_file_names(urls: Sequence[str]) -> list[str]:
    """The file name each URL serves (what the file is called on disk)."""
    return [A.url_file_name(u) for u in urls]


def _official_sources(name: str, data_root: Path, urls: list[str], digests: list[str],
                      download: Optional[bool], console: Console) -> tuple[list[Path], list[dict]]:
    """The official files: found on disk, else downloaded (see :func:`prepare_dataset`)."""
    if len(digests) > len(urls):
        raise UserError(f"{len(digests)} --sha256 values for {len(urls)} official file(s)")
    downloads = data_root / "downloads"
    names = official_file_names(urls)
    found: dict[int, Path] = {}
    if download is not True:
        for i, fname in enumerate(names):
            for folder in (Path.cwd(), downloads):
                if (folder / fname).is_file():
                    found[i] = folder / fname
                    break
    missing = [i for i in range(len(urls)) if i not in found]
    if missing and download is False:
        raise UserError(_missing_message(name, [(names[i], urls[i]) for i in missing], downloads))
    paths: list[Path] = []
    sources: list[dict] = []
    for i, url in enumerate(urls):
        expected = digests[i] if i < len(digests) else None
        if i in found:
            path = found[i]
            console.print(f"using {path} (found on disk)", highlight=False)
            digest = A.read_digest_record(path) or A.sha256_file(path, console)
            if expected is not None and digest != expected:
                digest = A.sha256_file(path, console)  # the record may be stale
            A.check_sha256(path, expected, digest)
            sources.append({"path": str(path), "url": url, "sha256": digest, "found": True})
        else:
            try:
                # an explicit --download insists (retries with back-off); the default tries
                # briefly so that an offline machine gets its answer in seconds
                path, digest = A.download(url, downloads, expected_sha256=expected, console=console,
                                          **({} if download else {"retries": 1, "timeout": 20.0}))
            except UserError as e:
                if download:
                    raise
                raise UserError(f"{e}. {_missing_message(name, [(names[j], urls[j]) for j in missing], downloads)}"
                                ) from None
            sources.append({"path": str(path), "url": url, "sha256": digest})
        paths.append(path)
    return paths, sources


def _missing_message(name: str, missing: list[tuple[str, str]], downloads: Path) -> str:
    """One line: each missing official file, its URL and where to put it."""
    files = "; ".join(f"{fname} from {url}" for fname, url in missing)
    return (f"{name} needs {files}: put {'it' if len(missing) == 1 else 'them'} in {downloads}/ or the "
            f"current directory (or pass --src FILE), or run `dtop prepare {name}` with network access")


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
