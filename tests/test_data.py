"""llmbook.data: lookup order, checksums, and one-line errors when offline."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

import pytest

from llmbook import data


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty data dir and cache, and a network that always fails."""
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "data"))
    monkeypatch.setenv(data.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(data.ENV_OFFLINE, raising=False)
    (tmp_path / "data").mkdir()
    data._verified.clear()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    return tmp_path


def test_registry_is_complete():
    for d in data.DATASETS.values():
        assert d.url.startswith("https://") and len(d.sha256) == 64 and d.license


def test_finds_file_in_data_dir_and_verifies(isolated, monkeypatch):
    content = b"to be or not to be"
    fake = data.Dataset("toy", "toy.txt", "https://example.invalid/toy.txt",
                        __import__("hashlib").sha256(content).hexdigest(), "MIT", "toy")
    monkeypatch.setitem(data.DATASETS, "toy", fake)
    (isolated / "data" / "toy.txt").write_bytes(content)
    assert data.path("toy") == (isolated / "data" / "toy.txt").resolve()
    assert data.read_text("toy") == content.decode()


def test_cache_is_used_when_data_dir_lacks_file(isolated, monkeypatch):
    content = b"cached copy"
    fake = data.Dataset("toy", "toy.txt", "https://example.invalid/toy.txt",
                        __import__("hashlib").sha256(content).hexdigest(), "MIT", "toy")
    monkeypatch.setitem(data.DATASETS, "toy", fake)
    (isolated / "cache").mkdir()
    (isolated / "cache" / "toy.txt").write_bytes(content)
    assert data.path("toy") == isolated / "cache" / "toy.txt"


def test_checksum_mismatch_is_a_clear_error(isolated):
    (isolated / "data" / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(data.ChecksumError, match="does not match the registry"):
        data.path("tinyshakespeare")


def test_download_is_verified_and_atomic(isolated, monkeypatch):
    import io

    payload = b"downloaded bytes"
    fake = data.Dataset("toy", "toy.txt", "https://example.invalid/toy.txt",
                        __import__("hashlib").sha256(payload).hexdigest(), "MIT", "toy")
    monkeypatch.setitem(data.DATASETS, "toy", fake)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    got = data.path("toy")
    assert got == isolated / "cache" / "toy.txt" and got.read_bytes() == payload
    assert not [p for p in got.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_corrupt_download_is_rejected(isolated, monkeypatch):
    import io

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"junk"))
    with pytest.raises(data.ChecksumError, match="expected"):
        data.path("corpus.en")
    assert not (isolated / "cache" / "corpus.en").exists()


def test_offline_without_copy_names_the_variable(isolated):
    with pytest.raises(data.DataNotFoundError) as info:
        data.path("tinyshakespeare")
    message = str(info.value)
    assert "LLMBOOK_DATA_DIR" in message and "\n" not in message
    assert "python -m llmbook.data fetch tinyshakespeare" in message


def test_offline_flag_forbids_download(isolated, monkeypatch):
    monkeypatch.setenv(data.ENV_OFFLINE, "1")
    with pytest.raises(data.DataNotFoundError, match="downloads are off"):
        data.path("tinyshakespeare")


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(KeyError, match="tinyshakespeare"):
        data.path("no-such-dataset")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    env = {"LLMBOOK_DATA_DIR": str(tmp_path), "LLMBOOK_CACHE_DIR": str(tmp_path / "c"),
           "LLMBOOK_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "llmbook.data", "fetch", "tinyshakespeare"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "LLMBOOK_DATA_DIR" in run.stderr


def test_shared_data_when_present():
    """With the book's data folder configured (CI), every dataset verifies."""
    if data.data_dir() is None or not Path(data.data_dir()).is_dir():
        pytest.skip("LLMBOOK_DATA_DIR is not set")
    for name in data.DATASETS:
        assert data.local_copy(name) is not None, name


def test_file_lock_makes_a_second_holder_wait(tmp_path):
    order = []

    def second():
        with data.file_lock(tmp_path / "sub" / ".x.lock"):
            order.append("second")

    with data.file_lock(tmp_path / "sub" / ".x.lock"):  # creates the folder and the file
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first")  # the second holder is still waiting
    thread.join(10)
    assert order == ["first", "second"]


# --- Project Gutenberg ebooks: registered with their checksum, read without header and license -----------------

_GUTENBERG_TOY = (
    "The Project Gutenberg EBook of Toy, by Nobody\r\n\r\nThis eBook is for the use of anyone anywhere\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK TOY ***\r\n\r\nProduced by Anonymous Volunteers\r\n\r\n\r\n"
    "TOY\r\n\r\nChapter 1\r\nIt began.\r\n\r\nEnd of the Project Gutenberg EBook of Toy, by Nobody\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK TOY ***\r\n\r\n*** START: FULL LICENSE ***\r\nProject Gutenberg-tm\r\n"
)


def test_pride_and_prejudice_is_registered_with_its_checksum():
    d = data.DATASETS["pride_and_prejudice"]
    assert d.filename == "pride_and_prejudice.txt" and d.gutenberg
    assert d.sha256 == "859c908774105fe56669e355156f2c9db0fe4ad2b6b67c068e3f8731aae55a99"
    assert "cytora/pycon-nlp-in-10-lines" in d.url and d.url.endswith("data/pride_and_prejudice.txt")
    assert not data.DATASETS["tinyshakespeare"].gutenberg  # other datasets are read as they are


def test_gutenberg_body_cuts_header_credit_and_footer():
    assert data.gutenberg_body(_GUTENBERG_TOY) == "TOY\n\nChapter 1\nIt began.\n"
    # today's wording ("THE" instead of "THIS") is recognised too
    modern = _GUTENBERG_TOY.replace("OF THIS PROJECT", "OF THE PROJECT")
    assert data.gutenberg_body(modern) == "TOY\n\nChapter 1\nIt began.\n"


@pytest.mark.parametrize("cut", ["*** START OF THIS", "*** END OF THIS"])
def test_gutenberg_body_without_a_marker_is_one_clear_line(cut):
    with pytest.raises(data.GutenbergFormatError, match="not a Project Gutenberg ebook") as info:
        data.gutenberg_body(_GUTENBERG_TOY.replace(cut, "*** SOMETHING ELSE"))
    assert "\n" not in str(info.value)
    with pytest.raises(data.GutenbergFormatError):
        data.gutenberg_body("plain text with no markers")


def test_read_text_of_pride_and_prejudice_is_the_novel_only():
    if data.data_dir() is None or data.local_copy("pride_and_prejudice") is None:
        pytest.skip("LLMBOOK_DATA_DIR does not hold pride_and_prejudice.txt")
    raw = data.path("pride_and_prejudice").read_text(encoding="utf-8")
    body = data.read_text("pride_and_prejudice")
    assert raw.count("Gutenberg") > 50  # the raw file carries the license
    assert body.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\n"
                           "It is a truth universally acknowledged")
    assert body.endswith("had been the means of uniting them.\n")
    for licence_word in ("gutenberg", "license", "ebook", "anonymous volunteers", "***"):
        assert licence_word not in body.lower(), licence_word
    assert body in raw and len(body) == 684_768  # a slice of the file: nothing rewritten inside the novel
