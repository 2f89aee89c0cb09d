"""Tests of the archive download against a local HTTP server and against unreachable hosts."""

from __future__ import annotations

import io
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mlprobe.errors import DownloadError
from mlprobe.extract.datasets import load_split
from mlprobe.extract.demo_data import build_demo_data
from mlprobe.extract.download import ARCHIVES, OFFICIAL_BASE_URLS, download

VOC_TRAINVAL = "VOCtrainval_06-Nov-2007.tar"
VOC_TEST = "VOCtest_06-Nov-2007.tar"


class ArchiveServer:
    """HTTP server on 127.0.0.1 that serves in-memory files with single-range support.

    files: URL path -> bytes. truncate_once: URL paths whose first GET sends the full
    Content-Length but only half of the body. requests: (path, Range header) per GET.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.truncate_once: set[str] = set()
        self.honor_range = True
        self.requests: list[tuple[str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def _handler_class(self):
        archive_server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                range_header = self.headers.get("Range")
                archive_server.requests.append((self.path, range_header))
                body = archive_server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return

                start = 0
                if range_header and archive_server.honor_range:
                    start = int(range_header.removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()

                payload = body[start:]
                if self.path in archive_server.truncate_once:
                    archive_server.truncate_once.discard(self.path)
                    payload = payload[: len(payload) // 2]
                    self.close_connection = True
                self.wfile.write(payload)

            def log_message(self, format, *args):
                pass

        return Handler

    def __enter__(self) -> "ArchiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def tar_bytes(root: Path, members: list[Path]) -> bytes:
    """Pack files (paths relative to root) into an uncompressed tar held in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as bundle:
        for member in members:
            bundle.add(root / member, arcname=member.as_posix())
    return buffer.getvalue()


def zip_bytes(root: Path, members: list[Path]) -> bytes:
    """Pack files (paths relative to root) into a zip held in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for member in members:
            bundle.write(root / member, arcname=member.as_posix())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Demo dataset (6 train, 4 test images) whose files the archives are made of."""
    out = tmp_path_factory.mktemp("source") / "demo"
    build_demo_data(out, n_train=6, n_test=4, seed=0, cell=16)
    return out


@pytest.fixture(scope="module")
def voc_archives(demo) -> dict[str, bytes]:
    """The two VOC 2007 tar archives, split by trainval and test like the official ones."""
    voc_dir = Path("VOCdevkit") / "VOC2007"
    main_dir = voc_dir / "ImageSets" / "Main"
    archives = {}
    for name, split in ((VOC_TRAINVAL, "trainval"), (VOC_TEST, "test")):
        ids = (demo / main_dir / f"{split}.txt").read_text().split()
        members = [voc_dir / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        members += sorted(path.relative_to(demo) for path in (demo / main_dir).glob(f"*{split}.txt"))
        archives[f"/{name}"] = tar_bytes(demo, members)
    return archives


def free_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_voc_download_extracts_layout(tmp_path, demo, voc_archives):
    with ArchiveServer(voc_archives) as server:
        download("voc2007", tmp_path, progress=False, base_url=server.base_url, expected_sizes={})

    for split in ("trainval", "test"):
        found = load_split("voc2007", tmp_path, split)
        expected = load_split("voc2007", demo, split)
        assert [sample.image_id for sample in found.samples] == [sample.image_id for sample in expected.samples]
        np.testing.assert_array_equal(found.labels(), expected.labels())
    downloads = sorted(path.name for path in (tmp_path / "downloads").iterdir())
    assert downloads == [f"{VOC_TEST}.extracted", f"{VOC_TRAINVAL}.extracted"]


def test_download_resumes_partial_file(tmp_path, voc_archives):
    archive = voc_archives[f"/{VOC_TRAINVAL}"]
    sizes = {VOC_TRAINVAL: len(archive), VOC_TEST: len(voc_archives[f"/{VOC_TEST}"])}

    with ArchiveServer(voc_archives) as server:
        server.truncate_once.add(f"/{VOC_TRAINVAL}")
        with pytest.raises(DownloadError, match="run the download again to resume"):
            download("voc2007", tmp_path, progress=False, base_url=server.base_url, expected_sizes=sizes)
        part = tmp_path / "downloads" / f"{VOC_TRAINVAL}.part"
        received = part.stat().st_size
        assert received == len(archive) // 2

        download("voc2007", tmp_path, progress=False, base_url=server.base_url, expected_sizes=sizes)

    assert (f"/{VOC_TRAINVAL}", f"bytes={received}-") in server.requests
    assert not part.exists()
    assert len(load_split("voc2007", tmp_path, "trainval").samples) == 6


def test_download_restarts_when_range_ignored(tmp_path, voc_archives):
    part = tmp_path / "downloads" / f"{VOC_TRAINVAL}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes that the server will not continue")

    with ArchiveServer(voc_archives) as server:
        server.honor_range = False
        download("voc2007", tmp_path, progress=False, base_url=server.base_url, expected_sizes={})

    assert len(load_split("voc2007", tmp_path, "test").samples) == 4


def test_download_size_mismatch(tmp_path, voc_archives):
    size = len(voc_archives[f"/{VOC_TRAINVAL}"])

    with ArchiveServer(voc_archives) as server:
        with pytest.raises(DownloadError) as caught:
            download("voc2007", tmp_path, progress=False, base_url=server.base_url, expected_sizes={VOC_TRAINVAL: size + 1})

    assert f"{server.base_url}{VOC_TRAINVAL} has {size} bytes but the official archive has {size + 1}" in str(caught.value)
    assert not (tmp_path / "VOCdevkit").exists()


def test_download_skips_finished_archives(tmp_path, voc_archives):
    with ArchiveServer(voc_archives) as server:
        download("voc2007", tmp_path, progress=False, base_url=server.base_url, expected_sizes={})
        first_requests = len(server.requests)
        download("voc2007", tmp_path, progress=False, base_url=server.base_url, expected_sizes={})

    assert first_requests == 2
    assert len(server.requests) == 2


def test_coco_download_extracts_layout(tmp_path, demo):
    coco = demo / "coco"
    files = {
        "/annotations/annotations_trainval2017.zip": zip_bytes(coco, sorted(
            path.relative_to(coco) for path in (coco / "annotations").glob("*.json"))),
        "/zips/train2017.zip": zip_bytes(coco, sorted(path.relative_to(coco) for path in (coco / "train2017").iterdir())),
        "/zips/val2017.zip": zip_bytes(coco, sorted(path.relative_to(coco) for path in (coco / "val2017").iterdir())),
    }

    with ArchiveServer(files) as server:
        download("coco2017", tmp_path, progress=False, base_url=server.base_url, expected_sizes={})

    for split in ("train", "val"):
        found = load_split("coco2017", tmp_path, split)
        expected = load_split("coco2017", coco, split)
        np.testing.assert_array_equal(found.labels(), expected.labels())


def test_download_unreachable_local_port(tmp_path):
    base_url = f"http://127.0.0.1:{free_port()}/voc/"

    with pytest.raises(DownloadError) as caught:
        download("voc2007", tmp_path, progress=False, base_url=base_url)

    message = str(caught.value)
    assert f"cannot reach {base_url}{VOC_TRAINVAL}" in message
    assert f"{base_url}{VOC_TEST}" in message
    assert str(tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages") in message
    assert not (tmp_path / "downloads").exists()


@pytest.mark.parametrize("dataset", sorted(ARCHIVES))
def test_download_offline_names_url_and_layout(tmp_path, dataset):
    host = OFFICIAL_BASE_URLS[dataset].split("/")[2]
    try:
        socket.create_connection((host, 80), timeout=2).close()
    except OSError:
        pass
    else:
        pytest.skip(f"{host} is reachable, so the offline failure cannot be observed")

    with pytest.raises(DownloadError) as caught:
        download(dataset, tmp_path, progress=False)

    message = str(caught.value)
    assert f"cannot reach {OFFICIAL_BASE_URLS[dataset]}{ARCHIVES[dataset][0]}" in message
    for path in ARCHIVES[dataset]:
        assert OFFICIAL_BASE_URLS[dataset] + path in message
    layout_file = "JPEGImages" if dataset == "voc2007" else f"instances_train{dataset[-4:]}.json"
    assert layout_file in message
    assert not (tmp_path / "downloads").exists()


def test_download_unknown_dataset(tmp_path):
    with pytest.raises(DownloadError, match="downloadable datasets: voc2007, coco2014, coco2017"):
        download("imagenet", tmp_path)
