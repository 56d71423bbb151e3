"""Downloads for the ``paper`` profile: a registry of public data sets, resumable fetch, safe extraction.

Only the ``paper`` profile downloads anything, and only when a chapter calls :func:`fetch`; nothing
runs at import. The ``smoke`` and ``book`` profiles use data that is shipped or generated offline.
Every archive is checked against a SHA-256 and unpacked by :func:`safe_extract`, which refuses
members that would land outside the target folder.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import gzip
import http.client
import lzma
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit

from tqdm import tqdm  # text bars: a widget would need JavaScript in the built book

from adlib.core.checksum import CHUNK, sha256sum


@dataclass(frozen=True)
class Resource:
    """One downloadable file.

    ``sha256`` is the reference hash (``None`` if no trustworthy one is known: :func:`fetch` then
    prints the hash it computed so you can compare it with the publisher's). ``size`` is in bytes
    (informative: the progress bar's total when the server does not send one). ``kind`` says what
    the file is (``"tar.xz"``, ``"tar"``, ``"zip"``, ...); :func:`safe_extract` reads the format from
    the file's content, not from this field.

    Used by: ``adlib.data.download.fetch``.
    """

    name: str
    url: str
    sha256: str | None
    size: int | None
    filename: str
    kind: str
    homepage: str
    license_note: str


# URLs and SHA-256 as pinned by anomalib's data modules (src/anomalib/data/datamodules/image/
# {mvtecad,visa,btech}.py); the MVTec AD and VisA sizes agree across several independent logs, the
# BTAD size is the Content-Length its server reported in one such log.
REGISTRY: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource(
            name="mvtec_ad",
            url="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/"
            "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
            sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
            size=5_264_982_680,
            filename="mvtec_anomaly_detection.tar.xz",
            kind="tar.xz",
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
            license_note="CC BY-NC-SA 4.0 (non-commercial use); accept MVTec's terms on the homepage first. "
            "Extracts to <dest>/<category>/{train,test,ground_truth}.",
        ),
        Resource(
            name="visa",
            url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
            sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
            size=1_929_840_640,
            filename="VisA_20220922.tar",
            kind="tar",
            homepage="https://github.com/amazon-science/spot-diff",
            license_note="CC BY 4.0 (spot-diff README). Extracts to <dest>/<object>/Data and <dest>/split_csv; "
            "apply the one-class split with adlib.data.visa.visa_to_mvtec(<dest>, <out_root>).",
        ),
        Resource(
            name="btad",
            url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
            sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
            size=1_229_193_337,
            filename="btad.zip",
            kind="zip",
            homepage="https://github.com/pankajmishra000/VT-ADL",
            license_note="CC BY-NC-SA 4.0 (as stated by anomalib). Extracts to <dest>/BTech_Dataset_transformed/"
            "<01|02|03>/ with ok/ and ko/ folders, which adlib.data.mvtec.MVTecDataset reads as is.",
        ),
    )
}


def fetch(
    name_or_resource: str | Resource,
    dest_dir: str | Path,
    *,
    extract: bool = True,
    timeout: float = 10.0,
    overwrite: bool = False,
) -> Path:
    """Download a registry entry (or any :class:`Resource`) into ``dest_dir``, verify it, unpack it.

    The archive goes to ``dest_dir/<filename>``, via ``<filename>.part`` so an interrupted download
    resumes where it stopped (HTTP Range). An archive already there is verified, not downloaded
    again; once unpacked, a marker file (``.<filename>.extracted``, delete it to unpack again) makes
    later calls return at once, offline. A hash mismatch raises and keeps the file as
    ``<filename>.sha256-mismatch``. An unreachable host raises a ``RuntimeError`` within ``timeout``
    seconds that says where to put a file downloaded by hand.

    Returns ``dest_dir`` when ``extract`` is true, else the archive's path.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if isinstance(name_or_resource, Resource):
        res = name_or_resource
    elif name_or_resource in REGISTRY:
        res = REGISTRY[name_or_resource]
    else:
        raise ValueError(f"Unknown resource {name_or_resource!r}; known: {sorted(REGISTRY)}.")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / res.filename
    marker = dest / f".{res.filename}.extracted"
    if extract and marker.is_file():
        return dest
    if archive.is_file():
        _verify(archive, archive, res)
    else:
        part = archive.with_name(archive.name + ".part")
        _download(res, part, archive, timeout)
        _verify(part, archive, res)
    if not extract:
        return archive
    safe_extract(archive, dest, overwrite=overwrite)
    marker.write_text(sha256sum(archive) if res.sha256 is None else res.sha256)
    return dest


def _download(res: Resource, part: Path, archive: Path, timeout: float) -> None:
    """Fetch ``res.url`` into ``part``, appending to what is already there when the server allows it."""
    url = urlsplit(res.url)
    if url.scheme not in ("http", "https"):
        raise ValueError(f"Only http(s) URLs can be fetched, got {res.url!r}.")
    by_hand = f"Download {res.url} by hand (see {res.homepage}) and place it at {archive}, then call fetch again."
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(res.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked above)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and have:  # nothing left to send: the .part file is already complete
            return
        raise RuntimeError(f"{url.netloc} answered HTTP {err.code} ({err.reason}) for {res.url}. {by_hand}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RuntimeError(f"could not reach {url.netloc}: {reason}. {by_hand}") from err
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else res.size
        got = have
        try:
            with part.open("ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=res.filename
            ) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise RuntimeError(
                f"Download of {res.url} stopped after {got} of {total} bytes ({err!r}); call fetch again to "
                f"resume from {part}. {by_hand}"
            ) from err
    if length is not None and got < total:
        raise RuntimeError(
            f"Download of {res.url} stopped after {got} of {total} bytes; call fetch again to resume "
            f"from {part}. {by_hand}"
        )


def _verify(path: Path, archive: Path, res: Resource) -> None:
    """Check ``path`` against ``res.sha256`` and move it to ``archive``; a bad file is kept, renamed."""
    actual = sha256sum(path)
    if res.sha256 is None:
        print(
            f"sha256 of {archive.name}: {actual} (the registry has no reference hash for {res.name!r}; "
            f"compare it with the one published at {res.homepage})"
        )
    elif actual != res.sha256.lower():
        bad = archive.with_name(archive.name + ".sha256-mismatch")
        path.replace(bad)
        raise ValueError(
            f"sha256 mismatch for {archive}: expected {res.sha256}, got {actual}. The file was kept as {bad}; "
            f"delete it and call fetch again, or download {res.url} by hand and place it at {archive}."
        )
    if path != archive:
        path.replace(archive)


def _safe_target(name: str, root: Path, is_dir: bool, overwrite: bool, archive: Path) -> Path:
    """Where member ``name`` would be written under ``root``; raises if that is unsafe or taken."""
    # PureWindowsPath splits on both / and \, so "..\\x" and "C:x" are caught on every OS.
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise ValueError(f"Refusing to extract {archive}: member {name!r} has an absolute path.")
    if ".." in PureWindowsPath(name).parts:
        raise ValueError(f"Refusing to extract {archive}: member {name!r} contains '..' and could escape {root}.")
    dest = (root / name).resolve()  # resolve() also follows symlinks already inside the target
    if dest != root and root not in dest.parents:
        raise ValueError(f"Refusing to extract {archive}: member {name!r} would be written outside {root}.")
    if dest.exists() and not (is_dir and dest.is_dir()) and not overwrite:
        raise FileExistsError(
            f"Extracting {archive} would overwrite {dest} (member {name!r}); pass overwrite=True to replace it."
        )
    return dest


def safe_extract(archive: str | Path, target: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Unpack a tar (any compression) or zip archive into ``target``; returns the files written.

    The whole archive is read and checked before anything is written: absolute paths, ``..``,
    symlinks, hard links, devices and FIFOs are refused with the member's name, so are existing
    files unless ``overwrite=True``, and a corrupt archive fails with a clear error.

    Used by: ``adlib.data.download.fetch``.
    """
    archive, root = Path(archive), Path(target).resolve()
    if not archive.is_file():
        raise FileNotFoundError(f"Archive {archive} not found.")
    corrupt = f"{archive} is corrupt or incomplete (delete it and download it again)"
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()  # reads every member once: corruption shows up before writing
                if bad is not None:
                    raise ValueError(f"{corrupt}: member {bad!r} fails its CRC check.")
                plan = [(info, _zip_target(info, root, overwrite, archive)) for info in zf.infolist()]
                return _write(plan, zf.open, lambda info: info.is_dir(), root, archive)
        with tarfile.open(archive, "r:*") as tf:
            plan = [(m, _tar_target(m, root, overwrite, archive)) for m in tf.getmembers()]
            return _write(plan, tf.extractfile, lambda m: m.isdir(), root, archive)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError) as err:
        raise ValueError(f"{corrupt}: {err}. Only tar (.tar, .tar.gz, .tar.xz, ...) and zip are supported.") from err


def _tar_target(m: tarfile.TarInfo, root: Path, overwrite: bool, archive: Path) -> Path:
    if m.issym() or m.islnk():
        raise ValueError(f"Refusing to extract {archive}: member {m.name!r} is a link (to {m.linkname!r}).")
    if not (m.isfile() or m.isdir()):
        raise ValueError(f"Refusing to extract {archive}: member {m.name!r} is a device, FIFO or other special file.")
    return _safe_target(m.name, root, m.isdir(), overwrite, archive)


def _zip_target(info: zipfile.ZipInfo, root: Path, overwrite: bool, archive: Path) -> Path:
    mode = info.external_attr >> 16  # Unix mode bits, 0 for archives made on Windows
    if stat.S_ISLNK(mode):
        raise ValueError(f"Refusing to extract {archive}: member {info.filename!r} is a symlink.")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f"Refusing to extract {archive}: member {info.filename!r} is a special file.")
    return _safe_target(info.filename, root, info.is_dir(), overwrite, archive)


def _write(
    plan: list[tuple], open_member: Callable, is_dir: Callable[[object], bool], root: Path, archive: Path
) -> list[Path]:
    """Write checked members: directories are created, file contents streamed; returns the files."""
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for member, dest in tqdm(plan, desc=f"extracting {archive.name}", unit="file"):
        if is_dir(member):
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open_member(member) as src, dest.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        written.append(dest)
    return written
