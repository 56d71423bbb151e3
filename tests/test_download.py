"""Tests for adlib.data.download: safe extraction, checksums and resumable fetch against a local HTTP server."""
from __future__ import annotations

import hashlib
import io
import re
import socket
import stat
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from adlib.core.checksum import sha256sum
from adlib.data.download import REGISTRY, Resource, fetch, safe_extract

FILES = {"cat/train/good/000.png": b"png bytes", "cat/readme.txt": b"hello\n", "top.txt": b"top"}


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] = ()) -> Path:
    """A tar archive with ``files`` followed by the (data-less) ``extra`` members."""
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def write_zip(path: Path, files: dict[str, bytes], extra: list[zipfile.ZipInfo] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info in extra:
            zf.writestr(info, b"/etc/passwd")
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- safe_extract


@pytest.mark.parametrize("fmt", ["w:gz", "w:xz", "w", "zip"])
def test_good_archives_extract(tmp_path: Path, fmt: str) -> None:
    archive = tmp_path / "a.bin"  # a misleading suffix: the format is read from the content
    write_zip(archive, FILES) if fmt == "zip" else write_tar(archive, FILES, fmt)
    written = safe_extract(archive, tmp_path / "out")
    assert tree(tmp_path / "out") == FILES
    assert sorted(written) == sorted((tmp_path / "out" / n).resolve() for n in FILES)


def symlink(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info



@pytest.mark.parametrize(
    ("files", "extra", "reason"),
    [
        ({"ok.txt": b"x", "../evil.txt": b"evil"}, [], "'..'"),
        ({"ok.txt": b"x", "sub/../../evil.txt": b"evil"}, [], "'..'"),
        ({"ok.txt": b"x", "/abs/path/evil.txt": b"evil"}, [], "absolute path"),
        ({"ok.txt": b"x"}, [symlink("passwd", "/etc/passwd")], "is a link"),
        ({"ok.txt": b"x"}, [symlink("inside", "ok.txt", tarfile.LNKTYPE)], "is a link"),
        ({"ok.txt": b"x"}, [symlink("dev", "", tarfile.CHRTYPE)], "special file"),
        ({"ok.txt": b"x"}, [symlink("fifo", "", tarfile.FIFOTYPE)], "special file"),
    ],
)
def test_malicious_tar_refused_before_writing(tmp_path: Path, files, extra, reason) -> None:
    archive = write_tar(tmp_path / "evil.tar.gz", files, extra=extra)
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match=re.escape(reason)):
        safe_extract(archive, out)
    assert not out.exists()  # not even the harmless ok.txt that came first
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_malicious_zips_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    dotdot = write_zip(tmp_path / "dotdot.zip", {"ok.txt": b"x", "../evil.txt": b"evil"})
    with pytest.raises(ValueError, match=re.escape("'../evil.txt'")):
        safe_extract(dotdot, out)
    backslash = write_zip(tmp_path / "win.zip", {"ok.txt": b"x", "..\\evil.txt": b"evil"})
    with pytest.raises(ValueError, match="contains '..'"):
        safe_extract(backslash, out)
    absolute = write_zip(tmp_path / "abs.zip", {"ok.txt": b"x", "/abs/evil.txt": b"evil"})
    with pytest.raises(ValueError, match="absolute path"):
        safe_extract(absolute, out)
    link = zipfile.ZipInfo("passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(ValueError, match="'passwd' is a symlink"):
        safe_extract(write_zip(tmp_path / "link.zip", {"ok.txt": b"x"}, [link]), out)
    assert not out.exists() and not (tmp_path / "deep" / "evil.txt").exists()


def test_symlink_already_in_target_cannot_redirect(tmp_path: Path) -> None:
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "data").symlink_to(outside)
    archive = write_tar(tmp_path / "a.tar", {"data/evil.txt": b"evil"}, "w")
    with pytest.raises(ValueError, match="outside"):
        safe_extract(archive, out)
    assert list(outside.iterdir()) == []


def test_existing_files_need_overwrite(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", FILES)
    out = tmp_path / "out"
    safe_extract(archive, out)
    (out / "top.txt").write_bytes(b"edited")
    with pytest.raises(FileExistsError, match=f"would overwrite {re.escape(str(out.resolve()))}.*overwrite=True"):
        safe_extract(archive, out)
    assert (out / "top.txt").read_bytes() == b"edited"
    safe_extract(archive, out, overwrite=True)
    assert tree(out) == FILES


def test_corrupt_archives_give_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        safe_extract(junk, tmp_path / "o1")
    big = {f"f{i}.bin": np.random.default_rng(i).bytes(20_000) for i in range(3)}
    data = write_tar(tmp_path / "t.tar.gz", big).read_bytes()
    (tmp_path / "t.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        safe_extract(tmp_path / "t.tar.gz", tmp_path / "o2")
    zdata = bytearray(write_zip(tmp_path / "z.zip", {"good.txt": b"fine", "bad.txt": b"A" * 100}).read_bytes())
    at = zdata.find(b"A" * 100)
    zdata[at : at + 5] = b"BBBBB"  # payload changed, CRC not
    (tmp_path / "z.zip").write_bytes(bytes(zdata))
    with pytest.raises(ValueError, match="'bad.txt' fails its CRC check"):
        safe_extract(tmp_path / "z.zip", tmp_path / "o3")
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()
    with pytest.raises(FileNotFoundError):
        safe_extract(tmp_path / "missing.zip", tmp_path / "o4")


def test_sha256sum_chunked_matches_hashlib(tmp_path: Path) -> None:
    blob = np.random.default_rng(1).bytes(10_007)
    (tmp_path / "b").write_bytes(blob)
    assert sha256sum(tmp_path / "b", chunk_size=7) == hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------- fetch over HTTP


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.payload``; honours ``Range: bytes=N-`` unless ``server.honour_range`` is false."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        if self.path != "/toy.tar.gz":
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and srv.honour_range else 0
        if start >= len(srv.payload):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(srv.payload)}")
            self.end_headers()
            return
        body = srv.payload[start:]
        self.send_response(206 if rng and srv.honour_range else 200)
        if rng and srv.honour_range:
            self.send_header("Content-Range", f"bytes {start}-{len(srv.payload) - 1}/{len(srv.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # simulate a dropped connection, once
            body, srv.cut_after = body[: srv.cut_after], None
        srv.sent += len(body)  # counted before writing, so the client never sees the bytes before the count
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path):
    files = {f"toy/{i}.bin": np.random.default_rng(i).bytes(40_000) for i in range(4)}
    payload = write_tar(tmp_path / "src.tar.gz", files).read_bytes()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.payload, srv.files, srv.requests, srv.sent, srv.honour_range, srv.cut_after = payload, files, [], 0, True, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def toy(srv, sha256: str | None = "right", path: str = "/toy.tar.gz") -> Resource:
    return Resource(
        name="toy",
        url=f"http://127.0.0.1:{srv.server_address[1]}{path}",
        sha256=hashlib.sha256(srv.payload).hexdigest() if sha256 == "right" else sha256,
        size=len(srv.payload),
        filename="toy.tar.gz",
        kind="tar.gz",
        homepage="http://example.invalid/toy",
        license_note="test data",
    )


def test_fetch_downloads_verifies_extracts_then_stays_offline(server, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    assert fetch(toy(server), dest) == dest
    assert server.requests == [None] and server.sent == len(server.payload)
    assert {k: v for k, v in tree(dest).items() if k.startswith("toy/")} == server.files
    assert (dest / "toy.tar.gz").read_bytes() == server.payload and not (dest / "toy.tar.gz.part").exists()
    (dest / "toy.tar.gz").unlink()  # e.g. deleted to save disk: the marker still says "done"
    assert fetch(toy(server), dest) == dest
    assert server.requests == [None]


def test_fetch_resumes_from_part_file(server, tmp_path: Path) -> None:
    k = 12_345
    (tmp_path / "toy.tar.gz.part").write_bytes(server.payload[:k])
    archive = fetch(toy(server), tmp_path, extract=False)
    assert archive == tmp_path / "toy.tar.gz" and archive.read_bytes() == server.payload
    assert server.requests == [f"bytes={k}-"] and server.sent == len(server.payload) - k
    assert not (tmp_path / "toy.tar.gz.part").exists()


def test_fetch_resumes_after_dropped_connection(server, tmp_path: Path) -> None:
    server.cut_after = 30_000
    with pytest.raises(RuntimeError, match=r"stopped after 30000 of \d+ bytes.*call fetch again to resume"):
        fetch(toy(server), tmp_path, extract=False)
    assert (tmp_path / "toy.tar.gz.part").stat().st_size == 30_000
    assert fetch(toy(server), tmp_path, extract=False).read_bytes() == server.payload
    assert server.requests == [None, "bytes=30000-"]


def test_fetch_complete_part_file_gets_416_and_is_used(server, tmp_path: Path) -> None:
    (tmp_path / "toy.tar.gz.part").write_bytes(server.payload)
    assert fetch(toy(server), tmp_path, extract=False).read_bytes() == server.payload
    assert server.requests == [f"bytes={len(server.payload)}-"] and server.sent == 0


def test_fetch_restarts_when_server_ignores_range(server, tmp_path: Path) -> None:
    server.honour_range = False
    (tmp_path / "toy.tar.gz.part").write_bytes(b"stale bytes from another file")
    assert fetch(toy(server), tmp_path, extract=False).read_bytes() == server.payload
    assert server.sent == len(server.payload)


def test_fetch_skips_archive_already_present(server, tmp_path: Path) -> None:
    (tmp_path / "toy.tar.gz").write_bytes(server.payload)  # e.g. downloaded by hand
    assert fetch(toy(server), tmp_path, extract=False) == tmp_path / "toy.tar.gz"
    assert server.requests == []


def test_fetch_checksum_mismatch_names_file_and_keeps_it(server, tmp_path: Path) -> None:
    actual = hashlib.sha256(server.payload).hexdigest()
    with pytest.raises(ValueError) as err:
        fetch(toy(server, sha256="0" * 64), tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "toy.tar.gz") in msg and "0" * 64 in msg and actual in msg
    assert not (tmp_path / "toy.tar.gz").exists() and not (tmp_path / "toy").exists()
    assert (tmp_path / "toy.tar.gz.sha256-mismatch").read_bytes() == server.payload


def test_fetch_without_reference_hash_prints_computed_one(server, tmp_path: Path, capsys) -> None:
    fetch(toy(server, sha256=None), tmp_path, extract=False)
    assert hashlib.sha256(server.payload).hexdigest() in capsys.readouterr().out


def test_fetch_http_error_is_clear(server, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="HTTP 404.*by hand"):
        fetch(toy(server, path="/missing.tar.gz"), tmp_path)


def test_fetch_unreachable_host_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = Resource("x", f"http://127.0.0.1:{port}/x", None, None, "x.zip", "zip", "http://example.invalid", "-")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        fetch(res, tmp_path, timeout=2)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert f"could not reach 127.0.0.1:{port}" in msg and "by hand" in msg and str(tmp_path / "x.zip") in msg
    assert not (tmp_path / "x.zip").exists()


def test_fetch_unknown_name_lists_registry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"known: \['btad', 'mvtec_ad', 'visa'\]"):
        fetch("imagenet", tmp_path)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_entries_are_consistent(name: str) -> None:
    res = REGISTRY[name]
    assert res.name == name and res.url.startswith("https://") and res.homepage.startswith("https://")
    assert res.url.rsplit("/", 1)[-1] == res.filename and res.filename.endswith("." + res.kind)
    assert res.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", res.sha256)
    assert res.license_note
