"""ADE20K (SceneParsing 2016): the official zip is already mmseg's layout, so extract and check.

Checking still matters: a zip cut short by a failed download, a label map of another size than
its image, or values above 150 would otherwise surface hours into training as a CUDA assert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from ..errors import UserError
from .archives import Archive, Member, Staging, copy_tree
from .common import (
    finish,
    guess_archive,
    guess_folder,
    raise_problems,
    refuse_foreign_target,
    same_path,
    single_source,
)
from .verify import DatasetLayout, read_marker, scan_dataset

TREE = "ADEChallengeData2016"
ANCHOR = f"{TREE}/images/"


def _find_tree(folder: Path) -> Optional[Path]:
    """The ADEChallengeData2016 folder given it or its parent."""
    for cand in (folder / TREE, folder):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    return None


def prepare_ade(
    paths: list[Path],
    target: Path,
    lay: DatasetLayout,
    *,
    workers: int,
    console: Optional[Console],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """Extract (or take) ADEChallengeData2016 into ``target`` after checking every pair."""
    src = single_source(paths, "ade20k", "ADEChallengeData2016.zip or its extracted folder")

    if src.is_dir():
        tree = _find_tree(src)
        if tree is None:
            raise UserError(
                f"{src} is not the extracted ADE20K folder (no {TREE}/images and annotations); "
                f"{guess_folder(src)}"
            )
        if same_path(tree, target):
            # The user extracted the zip where the presets look: check it and mark it, in place.
            if read_marker(target) is not None:
                raise UserError(f"{target} has a marker from another dataset; move it away")
            rep = scan_dataset(lay, target, workers, console)
            raise_problems(rep.problems, f"ADE20K folder {target}")
            return finish(target, "ade20k", rep.counts, rep.classes_seen, sources, [])
    if target.exists():
        refuse_foreign_target(target, "ade20k")

    with Staging(target) as st:
        staged = st.path / TREE
        if src.is_dir():
            copy_tree(tree, staged, console)
        else:
            with Archive(src) as ar:
                prefix = ar.find_prefix(ANCHOR)
                if prefix is None:
                    raise UserError(
                        f"{src.name} is not the ADE20K archive (no {ANCHOR} inside); {guess_archive(ar)}"
                    )
                root = prefix + TREE + "/"

                def select(m: Member) -> Optional[str]:
                    return m.name[len(prefix) :] if m.name.startswith(root) else None

                ar.extract(st.path, select, console)
        rep = scan_dataset(lay, staged, workers, console)
        raise_problems(rep.problems, f"ADE20K input {src.name}")
        res = finish(staged, "ade20k", rep.counts, rep.classes_seen, sources, [])
        st.install(TREE)
    return res
