"""Getting data: MedMNIST downloads checked by MD5 and written atomically, zips unpacked into the layout."""

import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from cli.main import main
from data.dataset import load_splits
from data.download import DownloadError, download_medmnist, fetch, unpack_zip
from tests.conftest import write_split


@pytest.fixture
def loopback_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving tmp_path/www; stopped by the test."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_medmnist_download_verifies_and_lands_atomically(loopback_server, npz_file, tmp_path):
    root, url = loopback_server
    served = root / "pneumoniamnist_224.npz"
    served.write_bytes(npz_file.read_bytes())
    cache = tmp_path / "cache"
    path = download_medmnist(cache, size=224, url=f"{url}/pneumoniamnist_224.npz", md5=_md5(served))
    assert path == cache / "pneumoniamnist_224.npz"
    assert path.read_bytes() == served.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["pneumoniamnist_224.npz"]
    assert len(load_splits(cache).train) == 40  # the cache dir is a data dir
    # a second call finds it in the cache and does not download again
    served.unlink()
    assert download_medmnist(cache, size=224, url=f"{url}/pneumoniamnist_224.npz", md5="0" * 32) == path


def test_corrupted_download_is_refused_and_leaves_nothing(loopback_server, npz_file, tmp_path):
    root, url = loopback_server
    good = npz_file.read_bytes()
    (root / "file.npz").write_bytes(good[:-100] + b"x" * 100)  # same size, corrupted tail
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(f"{url}/file.npz", cache / "pneumoniamnist_224.npz", hashlib.md5(good).hexdigest())
    assert list(cache.iterdir()) == []


def test_unreachable_or_missing_file_is_a_clear_error(loopback_server, tmp_path):
    _, url = loopback_server
    with pytest.raises(DownloadError, match="could not download.*404"):
        fetch(f"{url}/missing.npz", tmp_path / "x.npz", "0" * 32)
    assert list(tmp_path.glob("*x.npz*")) == []


def test_download_cli(loopback_server, npz_file, tmp_path, capsys):
    root, url = loopback_server
    (root / "p.npz").write_bytes(npz_file.read_bytes())
    args = ["data", "download", "--cache-dir", str(tmp_path / "c"), "--url", f"{url}/p.npz"]
    assert main([*args, "--md5", "f" * 32]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main([*args, "--md5", _md5(npz_file)]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()


def test_unpack_kaggle_zip_into_the_expected_layout(tmp_path):
    source = tmp_path / "src"
    write_split(source / "chest_xray" / "chest_xray" / "train", patients=3)  # Kaggle's duplicate copy
    for split in ("train", "val", "test"):
        write_split(source / "chest_xray" / split, patients=3, offset=100 * len(split))
    (source / "__MACOSX").mkdir()
    (source / "__MACOSX" / "._junk").write_bytes(b"\0")
    archive = tmp_path / "chest-xray-pneumonia.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, path.relative_to(source))
    dest = tmp_path / "data" / "chest_xray"
    assert main(["data", "download", "--zip", str(archive), "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["chest_xray", "test", "train", "val"]
    splits = load_splits(dest)
    assert splits.layout == "kaggle" and len(splits.test) == 12
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["chest_xray"]  # no staging dir left
    with pytest.raises(DownloadError, match="already exists"):
        unpack_zip(archive, dest)


def test_a_zip_without_the_layout_leaves_nothing(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "hello")
    dest = tmp_path / "data" / "x"
    with pytest.raises(ValueError, match="expected"):
        unpack_zip(archive, dest)
    assert list((tmp_path / "data").iterdir()) == []
