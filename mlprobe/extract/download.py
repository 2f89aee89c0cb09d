"""Download and extract Pascal VOC 2007 and MS-COCO from their official archive addresses.

Each archive is fetched into ``<root>/downloads/<name>.part``, and an HTTP Range request
resumes a partial file. The finished file is checked against the known archive size, or
against the server's Content-Length when the size is not known. It is then extracted into
``root`` in the layout that ``load_split`` reads, and deleted. A marker file ``<root>/downloads/<name>.extracted``
makes a second run skip finished archives.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from mlprobe.defaults import DOWNLOAD_CONNECT_TIMEOUT, DOWNLOAD_READ_TIMEOUT
from mlprobe.errors import DownloadError

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URLS = {
    "voc2007": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
    "coco2014": "http://images.cocodataset.org/",
    "coco2017": "http://images.cocodataset.org/",
}

# Archive paths relative to the base URL, small archives first.
ARCHIVES = {
    "voc2007": ("VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"),
    "coco2014": ("annotations/annotations_trainval2014.zip", "zips/val2014.zip", "zips/train2014.zip"),
    "coco2017": ("annotations/annotations_trainval2017.zip", "zips/val2017.zip", "zips/train2017.zip"),
}

# Sizes in bytes of the official archives, equal to the HTTP Content-Length of the addresses above.
ARCHIVE_SIZES = {
    "VOCtrainval_06-Nov-2007.tar": 460_032_000,
    "VOCtest_06-Nov-2007.tar": 451_020_800,
    "annotations_trainval2014.zip": 252_872_794,
    "val2014.zip": 6_645_013_297,
    "train2014.zip": 13_510_573_713,
    "annotations_trainval2017.zip": 252_907_541,
    "val2017.zip": 815_585_330,
    "train2017.zip": 19_336_861_798,
}

CHUNK_BYTES = 1 << 20
DOWNLOAD_DIR = "downloads"


def download(
    dataset: str,
    root: Path,
    *,
    progress: bool = True,
    base_url: str | None = None,
    expected_sizes: dict[str, int] | None = None,
    keep_archives: bool = False,
) -> Path:
    """Download the archives of a dataset and extract them into ``root``.

    Args:
        dataset: ``voc2007``, ``coco2014`` or ``coco2017``.
        root: destination folder, afterwards usable as the ``root`` of ``load_split``.
        progress: show a tqdm bar per archive.
        base_url: address that the archive paths are appended to, in place of the
            official host (for a mirror).
        expected_sizes: archive file name -> size in bytes; defaults to the sizes of the
            official archives. Archives missing from it are checked against the
            server's Content-Length.
        keep_archives: keep the archive files after extraction.

    Returns:
        ``root``, resolved.

    Raises:
        DownloadError: unknown dataset, host unreachable (raised within about
            DOWNLOAD_CONNECT_TIMEOUT seconds), HTTP error, interrupted transfer, size
            mismatch or damaged archive. The message names the address and what to do.
    """
    if dataset not in ARCHIVES:
        raise DownloadError(f"cannot download dataset {dataset!r}; downloadable datasets: {', '.join(ARCHIVES)}")

    root = Path(root).expanduser().resolve()
    base = (base_url or OFFICIAL_BASE_URLS[dataset]).rstrip("/") + "/"
    sizes = ARCHIVE_SIZES if expected_sizes is None else expected_sizes
    urls = [base + path for path in ARCHIVES[dataset]]
    archive_dir = root / DOWNLOAD_DIR

    pending = [url for url in urls if not _marker(archive_dir, url).is_file()]
    if not pending:
        logger.info("%s is already downloaded and extracted in %s", dataset, root)
        return root
    _check_reachable(pending[0], dataset, root, urls)
    archive_dir.mkdir(parents=True, exist_ok=True)

    for url in pending:
        name = _archive_name(url)
        started = time.perf_counter()
        logger.info("downloading %s into %s", url, archive_dir)
        archive = fetch(url, archive_dir / name, sizes.get(name), progress=progress)
        _extract(archive, root)
        _marker(archive_dir, url).write_text(f"{archive.stat().st_size}\n", encoding="utf-8")
        if not keep_archives:
            archive.unlink()
        logger.info("extracted %s into %s in %.1f s", name, root, time.perf_counter() - started)

    logger.info("%s downloaded and extracted in %s", dataset, root)
    return root


def manual_layout(dataset: str, root: Path) -> str:
    """Describe where the extracted files of a dataset go, for placing them by hand."""
    if dataset == "voc2007":
        voc_dir = root / "VOCdevkit" / "VOC2007"
        return f"extract both .tar files into {root} so that {voc_dir}/JPEGImages/*.jpg and {voc_dir}/ImageSets/Main/*.txt exist"
    year = dataset[-4:]
    return (
        f"extract the three .zip files into {root} so that {root}/annotations/instances_train{year}.json, "
        f"{root}/annotations/instances_val{year}.json, {root}/train{year}/*.jpg and {root}/val{year}/*.jpg exist"
    )


def _archive_name(url: str) -> str:
    """Return the file name at the end of an archive address."""
    return Path(urllib.parse.urlparse(url).path).name


def _marker(archive_dir: Path, url: str) -> Path:
    """Return the file that marks an archive as downloaded and extracted."""
    return archive_dir / f"{_archive_name(url)}.extracted"


# --- Network ------------------------------------------------------------------------------


def _check_reachable(url: str, dataset: str, root: Path, urls: list[str]) -> None:
    """Open and close one TCP connection to the host of ``url``, bounded by the connect timeout.

    Name resolution has no timeout of its own, so the attempt runs in a daemon thread and
    is abandoned when it outlasts DOWNLOAD_CONNECT_TIMEOUT.
    """
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=DOWNLOAD_CONNECT_TIMEOUT).close()
        except OSError as error:
            failure.append(error)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(DOWNLOAD_CONNECT_TIMEOUT)
    if attempt.is_alive():
        failure.append(TimeoutError(f"no connection within {DOWNLOAD_CONNECT_TIMEOUT:g} s"))
    if failure:
        logger.error("cannot reach %s:%d: %s", parsed.hostname, port, failure[0])
        raise DownloadError(
            f"cannot reach {url} ({failure[0]}); without network, download {' and '.join(urls)} "
            f"elsewhere and {manual_layout(dataset, root)}"
        )


def fetch(url: str, destination: Path, expected_size: int | None, *, progress: bool = True) -> Path:
    """Download ``url`` to ``destination`` through ``<destination>.part``, resuming a partial file.

    Args:
        url: archive address (http or https).
        destination: final file path; an existing file of the expected size is kept.
        expected_size: size in bytes, or None to trust the server's length header.
        progress: show a tqdm bar in bytes.

    Returns:
        ``destination`` once it contains exactly the expected number of bytes.

    Raises:
        DownloadError: HTTP error, connection failure, interrupted transfer (the partial
            file stays for the next run) or size mismatch.
    """
    if destination.is_file() and expected_size in (None, destination.stat().st_size):
        logger.info("%s is already downloaded", destination)
        return destination

    part = destination.with_name(destination.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        logger.warning("%s is larger than the %d bytes of %s; starting over", part, expected_size, url)
        part.unlink()
        offset = 0
    if expected_size is None or offset < expected_size:
        expected_size = _transfer(url, part, offset, expected_size, progress)

    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise DownloadError(
            f"{url}: received {size} bytes but the archive has {expected_size}; the partial file was deleted, run the download again"
        )
    os.replace(part, destination)
    logger.info("downloaded %s (%d bytes)", destination, size)
    return destination


def _transfer(url: str, part: Path, offset: int, expected_size: int | None, progress: bool) -> int | None:
    """Append the bytes of ``url`` from ``offset`` on to ``part`` and return the total size."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_READ_TIMEOUT)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url} returned HTTP {error.code} {error.reason}; check the address or try again later") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"cannot connect to {url} ({error}); check the network and run the download again") from error

    with response:
        offset, total = _response_range(response, url, offset)
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(
                f"{url} has {total} bytes but the official archive has {expected_size}; the host serves "
                f"another file, so check the address (for a mirror, pass its sizes as expected_sizes)"
            )
        total = expected_size if expected_size is not None else total
        if offset:
            logger.info("resuming %s at byte %d of %s", url, offset, total)
        _copy_body(response, url, part, offset, total, progress)
    return total


def _response_range(response, url: str, offset: int) -> tuple[int, int | None]:
    """Return (first byte of the body, total size) from the status and headers of a response."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            raise DownloadError(
                f"{url} responded to the range request from byte {offset} with Content-Range "
                f"{response.headers.get('Content-Range')!r}; delete the .part file and run again"
            )
        return offset, None if match.group(2) == "*" else int(match.group(2))

    if offset:
        logger.info("%s ignored the range request; downloading from the start", url)
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _copy_body(response, url: str, part: Path, offset: int, total: int | None, progress: bool) -> None:
    """Stream the response body into ``part`` (appending when offset > 0) with a byte bar."""
    with part.open("ab" if offset else "wb") as handle, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
        desc=_archive_name(url), disable=not progress,
    ) as bar:
        try:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as error:
            _raise_interrupted(url, part, handle.tell(), total, repr(error))

        # http.client returns an empty read, not an error, when the server closes the
        # connection before Content-Length bytes arrived.
        if total is not None and handle.tell() < total:
            _raise_interrupted(url, part, handle.tell(), total, "connection closed early")


def _raise_interrupted(url: str, part: Path, received: int, total: int | None, reason: str) -> None:
    """Log and raise the DownloadError of a transfer that stopped before its end."""
    logger.error("download of %s stopped at byte %d: %s", url, received, reason)
    raise DownloadError(
        f"download of {url} stopped after {received} of {total if total is not None else 'unknown'} bytes "
        f"({reason}); run the download again to resume from {part}"
    )


# --- Extraction ---------------------------------------------------------------------------


def _extract(archive: Path, root: Path) -> None:
    """Extract a .tar or .zip archive into a staging folder, then merge it into ``root``."""
    staging = root / f".extracting-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if tarfile.is_tarfile(archive):
            _extract_tar(archive, staging)
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(staging)
        else:
            raise DownloadError(f"{archive} is neither a tar nor a zip archive; delete it and run the download again")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive} is damaged ({error}); delete it and run the download again") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    _merge_tree(staging, root)
    shutil.rmtree(staging, ignore_errors=True)


def _extract_tar(archive: Path, folder: Path) -> None:
    """Extract a tar archive, rejecting members that would land outside ``folder``."""
    with tarfile.open(archive) as bundle:
        if hasattr(tarfile, "data_filter"):
            bundle.extractall(folder, filter="data")
            return
        for member in bundle.getmembers():
            target = (folder / member.name).resolve()
            if not target.is_relative_to(folder.resolve()) or member.issym() or member.islnk():
                raise DownloadError(f"{archive} member {member.name!r} points outside the archive folder; the archive is not safe to extract")
        bundle.extractall(folder)


def _merge_tree(source: Path, destination: Path) -> None:
    """Move the contents of ``source`` into ``destination``, merging folders that exist in both."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        target = destination / entry.name
        if entry.is_dir() and target.is_dir():
            _merge_tree(entry, target)
        else:
            os.replace(entry, target)
