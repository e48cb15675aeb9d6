"""Download (resume, digests), safe extraction (zip-slip, links, truncation) and staging."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop_cli.cli import main
from dtop_cli.data import archives as A
from dtop_cli.errors import UserError


def _payload(n: int = 300_000) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_download_resumes_after_dropped_connection(server, tmp_path):
    data = _payload()
    server.files["big.bin"] = data
    server.drops_left, server.drop_after = 1, 100_000
    path, digest = A.download(server.url + "big.bin", tmp_path, backoff=0.0)
    assert path == tmp_path / "big.bin"
    assert path.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    # First request whole file, second asks exactly for the rest.
    assert server.requests == [None, "bytes=100000-"]
    assert (tmp_path / "big.bin.sha256").read_text() == f"{digest}  big.bin\n"
    assert not (tmp_path / "big.bin.part").exists()


def test_download_resumes_partial_file_of_an_earlier_run(server, tmp_path):
    data = _payload()
    server.files["big.bin"] = data
    server.drops_left, server.drop_after = 1, 123_456
    with pytest.raises(UserError, match="run the same command again to resume"):
        A.download(server.url + "big.bin", tmp_path, retries=0, backoff=0.0)
    part = tmp_path / "big.bin.part"
    assert part.read_bytes() == data[:123_456]
    assert not (tmp_path / "big.bin").exists()
    path, digest = A.download(
        server.url + "big.bin", tmp_path, expected_sha256=hashlib.sha256(data).hexdigest()
    )
    assert path.read_bytes() == data
    assert server.requests[-1] == "bytes=123456-"
    # A third call finds the finished file and its record: no request at all.
    n = len(server.requests)
    assert A.download(server.url + "big.bin", tmp_path) == (path, digest)
    assert len(server.requests) == n


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    data = _payload(50_000)
    server.files["f.bin"] = data
    server.honor_range = False
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # junk a Range request would keep
    path, _ = A.download(server.url + "f.bin", tmp_path)
    assert path.read_bytes() == data


def test_download_wrong_sha256_removes_file(server, tmp_path):
    server.files["f.bin"] = b"hello" * 1000
    with pytest.raises(UserError, match="expected 0000"):
        A.download(server.url + "f.bin", tmp_path, expected_sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_download_404_is_user_error(server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        A.download(server.url + "missing.zip", tmp_path)


def test_normalize_sha256_rejects_typos():
    assert A.normalize_sha256("AB" * 32) == "ab" * 32
    with pytest.raises(UserError, match="not a SHA-256"):
        A.normalize_sha256("abc")


# --------------------------------------------------------------------------- prepare --download


def _tiny_ade_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ADEChallengeData2016/objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n")
        for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
            im = io.BytesIO()
            Image.fromarray(np.full((8, 12, 3), 100, np.uint8)).save(im, format="JPEG")
            z.writestr(f"ADEChallengeData2016/images/{split}/{stem}.jpg", im.getvalue())
            lb = io.BytesIO()
            Image.fromarray(np.arange(96, dtype=np.uint8).reshape(8, 12) % 151).save(lb, format="PNG")
            z.writestr(f"ADEChallengeData2016/annotations/{split}/{stem}.png", lb.getvalue())
    return buf.getvalue()


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_prepare_download_wrong_sha_leaves_no_dataset(server, tmp_path, capsys):
    server.files["ADEChallengeData2016.zip"] = _tiny_ade_zip()
    root = tmp_path / "data"
    code, out, err = _run(
        capsys,
        [
            "prepare",
            "ade20k",
            "--download",
            "--url",
            server.url + "ADEChallengeData2016.zip",
            "--sha256",
            "f" * 64,
            "--data-root",
            str(root),
            "--json",
        ],
    )
    assert code == 2, err
    assert "expected ffff" in err and out == ""
    assert not (root / "ade").exists()
    assert not root.exists()  # the folders the failed download made are gone too


def test_prepare_download_interrupted_then_prepared(server, tmp_path, capsys):
    data = _tiny_ade_zip()
    server.files["ADEChallengeData2016.zip"] = data
    server.drops_left, server.drop_after = 1, len(data) // 3
    root = tmp_path / "data"
    digest = hashlib.sha256(data).hexdigest()
    code, out, err = _run(
        capsys,
        [
            "prepare",
            "ade20k",
            "--download",
            "--url",
            server.url + "ADEChallengeData2016.zip",
            "--sha256",
            digest.upper(),
            "--data-root",
            str(root),
            "--json",
            "--workers",
            "1",
        ],
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["sources"][0]["sha256"] == digest
    assert res["splits"]["train"]["pairs"] == 1 and res["splits"]["val"]["pairs"] == 1
    assert server.requests[-1] == f"bytes={len(data) // 3}-"
    assert (
        root / "ade" / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png"
    ).is_file()
    assert (root / "downloads" / "ADEChallengeData2016.zip.sha256").read_text().startswith(digest)


# --------------------------------------------------------------------------- unsafe archives


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] = {}) -> Path:  # noqa: B006
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name), data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return path


Entry = namedtuple("Entry", "name kind data link")


def _tar(path: Path, entries: list[Entry]) -> Path:
    with tarfile.open(path, "w") as t:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            if e.kind == "file":
                info.size = len(e.data)
                t.addfile(info, io.BytesIO(e.data))
            else:
                info.type = tarfile.SYMTYPE if e.kind == "sym" else tarfile.LNKTYPE
                info.linkname = e.link
                t.addfile(info)
    return path


def _nothing_outside(tmp_path: Path) -> None:
    assert not any(p.name == "evil.txt" for p in tmp_path.parent.rglob("evil.txt"))


@pytest.mark.parametrize("name", ["../evil.txt", "ok/../../evil.txt", "..\\evil.txt"])
def test_zip_with_dotdot_member_is_refused(tmp_path, name):
    z = _zip(tmp_path / "a.zip", {"good.txt": b"g", name: b"evil"})
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UserError, match=r"outside the target \('\.\.'\)"):
        with A.Archive(z) as ar:
            ar.extract(dest, lambda m: m.name)
    assert list(dest.iterdir()) == []
    _nothing_outside(tmp_path)


def test_zip_with_absolute_member_is_refused(tmp_path):
    evil = tmp_path / "outside" / "evil.txt"
    z = _zip(tmp_path / "a.zip", {str(evil): b"evil"})
    with pytest.raises(UserError, match="absolute path"):
        A.Archive(z)
    assert not evil.exists()


def test_zip_with_symlink_member_is_refused(tmp_path):
    z = _zip(tmp_path / "a.zip", {"a.txt": b"a"}, symlinks={"link": "/etc"})
    with pytest.raises(UserError, match="symbolic link"):
        A.Archive(z)


@pytest.mark.parametrize(
    "entries, msg",
    [
        ([Entry("d/link", "sym", b"", "/etc"), Entry("d/link/evil.txt", "file", b"x", "")], "link member"),
        ([Entry("d/hard", "hard", b"", "/etc/passwd")], "link member"),
        ([Entry("../evil.txt", "file", b"x", "")], r"\.\."),
        ([Entry("/tmp/evil.txt", "file", b"x", "")], "absolute path"),
    ],
)
def test_tar_with_unsafe_member_is_refused(tmp_path, entries, msg):
    t = _tar(tmp_path / "a.tar", [Entry("fine.txt", "file", b"ok", "")] + entries)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UserError, match=msg):
        with A.Archive(t) as ar:
            ar.extract(dest, lambda m: m.name)
    assert list(dest.iterdir()) == []
    _nothing_outside(tmp_path)


def test_extract_select_cannot_escape(tmp_path):
    z = _zip(tmp_path / "a.zip", {"a.txt": b"a"})
    dest = tmp_path / "dest"
    dest.mkdir()
    with A.Archive(z) as ar, pytest.raises(UserError):
        ar.extract(dest, lambda m: "../evil.txt")
    _nothing_outside(tmp_path)


def test_safe_extract_writes_files(tmp_path):
    t = _tar(
        tmp_path / "a.tar",
        [Entry("top/x/a.bin", "file", b"A" * 10, ""), Entry("top/b.bin", "file", b"B", "")],
    )
    with A.Archive(t) as ar:
        assert ar.find_prefix("x/a.bin") == "top/"
        n = ar.extract(tmp_path / "out", lambda m: m.name[len("top/") :])
    assert n == 2
    assert (tmp_path / "out" / "x" / "a.bin").read_bytes() == b"A" * 10


@pytest.mark.parametrize("raw, ok", [("a/b", "a/b"), ("./a//b/", "a/b"), ("a/./b", "a/b")])
def test_safe_member_name_normalises(raw, ok):
    assert A.safe_member_name(raw, "x") == ok


# --------------------------------------------------------------------------- truncated / corrupt


def test_truncated_zip(tmp_path):
    z = _zip(tmp_path / "a.zip", {f"f{i}.bin": os.urandom(5000) for i in range(4)})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        A.Archive(cut)


def test_zip_with_corrupt_member(tmp_path):
    data = bytearray(_zip(tmp_path / "a.zip", {"f.bin": b"0123456789" * 100}).read_bytes())
    i = data.index(b"0123456789")
    data[i + 5] ^= 0xFF  # stored (uncompressed): flip one byte of the content
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with A.Archive(bad) as ar, pytest.raises(UserError, match="truncated or corrupt"):
        ar.extract(tmp_path / "out", lambda m: m.name)


@pytest.mark.parametrize("where", ["mid-member", "member boundary"])
def test_truncated_tar(tmp_path, where):
    t = _tar(
        tmp_path / "a.tar",
        [Entry("a.bin", "file", os.urandom(3000), ""), Entry("b.bin", "file", os.urandom(3000), "")],
    )
    raw = t.read_bytes()
    with tarfile.open(t) as tf:
        b = tf.getmember("b.bin")
    cut_at = b.offset_data + 1000 if where == "mid-member" else b.offset_data + 3072  # 3000 padded to 512
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:cut_at])
    with pytest.raises(UserError, match="truncated"):
        with A.Archive(cut) as ar:
            ar.extract(tmp_path / "out", lambda m: m.name)


def test_not_an_archive(tmp_path):
    p = tmp_path / "x.zip"
    p.write_bytes(b"hello, I am text" * 100)
    with pytest.raises(UserError, match="neither a zip nor a tar"):
        A.Archive(p)


def test_missing_archive(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        A.Archive(tmp_path / "nope.zip")


# --------------------------------------------------------------------------- disk space and staging


def test_free_space_check_refuses_before_writing(tmp_path, monkeypatch):
    z = _zip(tmp_path / "a.zip", {"a.bin": b"x" * 1000})
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    with A.Archive(z) as ar, pytest.raises(UserError, match="not enough free disk space"):
        ar.extract(tmp_path / "out", lambda m: m.name)
    assert not (tmp_path / "out" / "a.bin").exists()


def test_staging_rolls_back_and_removes_only_what_it_made(tmp_path):
    user = tmp_path / "data" / "mine.txt"
    user.parent.mkdir()
    user.write_text("keep")
    target = tmp_path / "data" / "new" / "deeper" / "ds"
    with pytest.raises(RuntimeError):
        with A.Staging(target) as st:
            (st.path / "x").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["mine.txt"]
    assert user.read_text() == "keep"


def test_staging_installs_atomically(tmp_path):
    target = tmp_path / "data" / "ds"
    with A.Staging(target) as st:
        (st.path / "f").write_text("1")
        st.install()
    assert (target / "f").read_text() == "1"
    assert [p.name for p in target.parent.iterdir()] == ["ds"]


def test_copy_tree_leaves_source_alone(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f.txt").write_text("x")
    dst = tmp_path / "dst"
    assert A.copy_tree(src, dst) == 1
    shutil.rmtree(dst)
    assert (src / "a" / "f.txt").read_text() == "x"
