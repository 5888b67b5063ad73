"""A sharded on-disk activation store: safetensors shards + manifest.json, resumable.

Layout of a store folder:

    manifest.json              what the store is and which shards are complete
    shard_00000.safetensors    "mlp_in", "mlp_out": [n_tokens, L, d] in the storage dtype
    ...

Shard i holds the tokens of packed contexts [i*C, (i+1)*C) of the document stream
(C = contexts per shard), shuffled within the shard with a generator seeded by (seed, i).
So every shard depends only on the corpus, the model, the config and its index, and an
interrupted harvest resumes by skipping the contexts of its complete shards (tokenising
them again, but not running the model) and produces the same store as an uninterrupted run.

Crash safety: a shard is written to a temporary file, flushed and renamed (leftovers of a
killed run are removed on restart); then the manifest is
rewritten the same way. A shard counts only if the manifest lists it with the right size
and sha256; on restart anything else is regenerated (and said so). A disk that fills up
mid-harvest is a CltraceError saying to free space and rerun: the complete shards stay.

Reading (`ActivationStore.iter_batches`) visits shards in random order and tokens within a
shard in random order: memory is one shard plus one batch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cltrace.activations.buffer import ActivationBatch, ShuffleBuffer, rebatch
from cltrace.activations.harvest import (
    HarvestConfig,
    check_model,
    iter_contexts,
    iter_token_rows,
    limit_contexts,
    require_contexts,
)
from cltrace.errors import CltraceError
from cltrace.io import atomic_save_tensors, atomic_write_bytes, sha256_file
from cltrace.models.loading import LoadedModel
from cltrace.progress import progress

MANIFEST = "manifest.json"
FORMAT = "cltrace-activations/1"


@dataclass
class ShardRecord:
    """One complete shard as listed in the manifest."""

    file: str
    n_tokens: int
    bytes: int
    sha256: str
    context_start: int  # first packed context of the document stream in this shard
    context_stop: int  # one past the last


@dataclass
class Manifest:
    """Contents of manifest.json."""

    model: str
    layers: list[int]
    d_model: int
    dtype: str
    tokens_per_shard: int
    target_tokens: int
    config: dict[str, Any]
    corpus: dict[str, Any]
    shards: list[ShardRecord]
    complete: bool = False
    format: str = FORMAT

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    def identity(self) -> dict[str, Any]:
        """What must match for a restart to continue this store."""
        cfg = {k: v for k, v in self.config.items() if k != "buffer_tokens"}
        return dict(
            model=self.model,
            layers=self.layers,
            d_model=self.d_model,
            dtype=self.dtype,
            tokens_per_shard=self.tokens_per_shard,
            config=cfg,
            corpus=self.corpus,
        )

    def save(self, folder: Path) -> None:
        data = asdict(self) | {"n_tokens": self.n_tokens}
        atomic_write_bytes(folder / MANIFEST, json.dumps(data, indent=1).encode())

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CltraceError(
                f"{folder} is not an activation store (no {MANIFEST})",
                "create one with `cltrace harvest --out DIR`",
            ) from None
        except json.JSONDecodeError as err:
            raise CltraceError(
                f"{path} is not valid JSON: {err}", "delete the folder and harvest again"
            ) from err
        if data.get("format") != FORMAT:
            raise CltraceError(
                f"{folder} holds format {data.get('format')!r}, expected {FORMAT!r}",
                "harvest again with this version of cltrace",
            )
        data.pop("n_tokens", None)
        data["shards"] = [ShardRecord(**s) for s in data["shards"]]
        return cls(**data)


def shard_ok(folder: Path, rec: ShardRecord) -> bool:
    """The shard file exists with the recorded size and checksum."""
    path = folder / rec.file
    return path.is_file() and path.stat().st_size == rec.bytes and sha256_file(path) == rec.sha256


# ---------------------------------------------------------------------------------- writing


def check_disk_space(folder: Path, n_tokens: int, bytes_per_token: int) -> None:
    """CltraceError unless `folder`'s disk has room for `n_tokens` more tokens (+1% margin)."""
    need = int(n_tokens * bytes_per_token * 1.01) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CltraceError(
            f"not enough disk space in {folder}: need ~{need / 1e9:.2f} GB for {n_tokens:,} tokens, "
            f"{free / 1e9:.2f} GB free; use --tokens fewer or another --out",
            "the shards written so far are complete: rerun the same command with --resume to continue",
        )


def is_disk_full(err: BaseException) -> bool:
    """An OSError (or a library error wrapping one) saying the disk or quota is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "os error 28" in str(err)


@contextlib.contextmanager
def disk_full_is_a_user_error(out: Path) -> Iterator[None]:
    """Turn a full disk inside the block into a CltraceError (the store stays resumable)."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise CltraceError(
            f"disk full while writing the store in {out} ({err})",
            "free space and rerun the same command with --resume to continue: "
            "the shards written so far are complete and kept",
        ) from err


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_store(
    model: LoadedModel,
    documents: Iterable[str],
    out: Path | str,
    n_tokens: int,
    cfg: HarvestConfig,
    *,
    shard_tokens: int = 8192,
    corpus: dict[str, Any] | None = None,
    log: Callable[[str], None] = _stderr,
) -> ActivationStore:
    """Harvest `n_tokens` tokens of `documents` into a store at `out`, resuming if it exists.

    Args:
        model: loaded in the forward dtype of `cfg`.
        documents: the same deterministic stream on every (re)start.
        out: store folder (created if needed).
        n_tokens: tokens wanted in total; fewer if the documents run out first.
        cfg: harvest settings; `buffer_tokens` is unused (shards are the shuffle unit).
        shard_tokens: tokens per shard, rounded down to whole contexts.
        corpus: what the documents are (split, paths, ...), recorded in the manifest.
        log: where notes go (resuming, shards redone); stderr by default.

    Raises:
        CltraceError: empty corpus, not enough disk (before or during the harvest), or `out`
            holds a different harvest.
    """
    check_model(model, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.tmp"), *out.glob(".*.tmp")]:  # left by a killed run
        stale.unlink(missing_ok=True)
    with disk_full_is_a_user_error(out):
        fresh = _new_manifest(model, cfg, n_tokens, shard_tokens, corpus)
        return _fill(model, documents, out, _start_or_resume(out, fresh, log), cfg)


def _fill(
    model: LoadedModel, documents: Iterable[str], out: Path, manifest: Manifest, cfg: HarvestConfig
) -> ActivationStore:
    """Harvest shards until the manifest's target (or the end of the documents)."""
    n_tokens = manifest.target_tokens
    if manifest.n_tokens < n_tokens:
        contexts = require_contexts(iter_contexts(model, documents, cfg))
        _skip(contexts, manifest.shards[-1].context_stop if manifest.shards else 0)
        bar = progress(total=n_tokens, initial=manifest.n_tokens, desc="harvest", unit="tok", unit_scale=True)
        try:
            while manifest.n_tokens < n_tokens:
                if not _write_next_shard(model, contexts, cfg, out, manifest, bar):
                    break  # the documents ran out
        finally:
            bar.close()
    manifest.complete = True
    manifest.save(out)
    return ActivationStore(out)


def remove_store(folder: Path) -> None:
    """Delete a store's own files (manifest, shards, temporary files), nothing else in `folder`."""
    folder = Path(folder)
    for path in [
        folder / MANIFEST,
        *folder.glob("shard_*.safetensors"),
        *folder.glob("*.tmp"),
        *folder.glob(".*.tmp"),
    ]:
        path.unlink(missing_ok=True)


def _new_manifest(
    model: LoadedModel, cfg: HarvestConfig, n_tokens: int, shard_tokens: int, corpus: dict[str, Any] | None
) -> Manifest:
    per_shard = max(1, shard_tokens // cfg.tokens_per_context) * cfg.tokens_per_context
    forward = str(cfg.torch_forward_dtype(model.device)).removeprefix("torch.")
    config = asdict(cfg) | {"forward_dtype": forward}
    config["layers"] = cfg.layer_list(model.n_layers)
    return Manifest(
        model=model.name,
        layers=cfg.layer_list(model.n_layers),
        d_model=model.d_model,
        dtype=cfg.store_dtype,
        tokens_per_shard=per_shard,
        target_tokens=n_tokens,
        config=config,
        corpus=dict(corpus or {}),
        shards=[],
    )


def _start_or_resume(out: Path, fresh: Manifest, log: Callable[[str], None] = _stderr) -> Manifest:
    """The manifest to continue: `fresh` for a new store, else the old one minus bad shards."""
    if not (out / MANIFEST).exists():
        if any(out.glob("shard_*.safetensors")):
            raise CltraceError(f"{out} holds shards but no {MANIFEST}", "use an empty folder for --out")
        fresh.save(out)
        return fresh
    old = Manifest.load(out)
    if old.identity() != json.loads(json.dumps(fresh.identity())):
        raise CltraceError(
            f"{out} holds a different harvest (model, layers, config or corpus differ)",
            "use another --out, or the same settings to continue it",
        )
    listed = old.shards
    old.shards = _valid_prefix(out, listed)
    if len(old.shards) < len(listed):
        bad, redo = listed[len(old.shards)].file, len(listed) - len(old.shards)
        log(
            f"note: {bad} is missing, truncated or corrupt (size or sha256 differ from the manifest): "
            f"harvesting it{f' and the {redo - 1} shards after it' if redo > 1 else ''} again"
        )
    if old.shards:
        log(
            f"continuing the store in {out}: {old.n_tokens:,} tokens in {len(old.shards)} complete "
            "shards are kept"
        )
    short_tail = old.shards and old.shards[-1].n_tokens < old.tokens_per_shard
    if short_tail and fresh.target_tokens > old.n_tokens:
        old.shards.pop()  # rebuilt with more tokens (or identically if the corpus ends there)
    old.target_tokens, old.complete = fresh.target_tokens, False
    old.save(out)
    return old


def _valid_prefix(out: Path, shards: list[ShardRecord]) -> list[ShardRecord]:
    """Shards up to the first missing, truncated or checksum-failing one."""
    for i, rec in enumerate(shards):
        if not shard_ok(out, rec):
            return shards[:i]
    return shards


def _skip(contexts: Iterator[list[int]], n: int) -> None:
    """Consume the first `n` contexts (already stored)."""
    for i in range(n):
        if next(contexts, None) is None:
            raise CltraceError(
                f"the documents end after {i} contexts, but the store already holds {n}",
                "the corpus changed since the store was started: use another --out",
            )


def _write_next_shard(
    model: LoadedModel, contexts: Iterator[list[int]], cfg: HarvestConfig, out: Path, manifest: Manifest, bar
) -> bool:
    """Harvest, shuffle and write the next shard; False once the documents are exhausted."""
    index = len(manifest.shards)
    start = manifest.shards[-1].context_stop if manifest.shards else 0
    want = min(manifest.tokens_per_shard, manifest.target_tokens - manifest.n_tokens)
    shard_contexts = list(limit_contexts(contexts, want))
    if not shard_contexts:
        return False
    bytes_per_token = 2 * len(manifest.layers) * manifest.d_model * cfg.torch_store_dtype.itemsize
    check_disk_space(out, manifest.target_tokens - manifest.n_tokens, bytes_per_token)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    buffer = ShuffleBuffer(max(2, want), len(manifest.layers), manifest.d_model, cfg.torch_store_dtype, gen)
    for chunk in iter_token_rows(model, shard_contexts, cfg):
        buffer.push(chunk)
        bar.update(chunk.n_tokens)
    rec = _save_shard(out, index, buffer.drain(), start, start + len(shard_contexts))
    manifest.shards.append(rec)
    manifest.save(out)
    return True


def _save_shard(out: Path, index: int, acts: ActivationBatch, ctx_start: int, ctx_stop: int) -> ShardRecord:

    name = f"shard_{index:05d}.safetensors"
    path = atomic_save_tensors(
        {"mlp_in": acts.mlp_in.contiguous(), "mlp_out": acts.mlp_out.contiguous()}, out / name
    )
    return ShardRecord(
        file=name,
        n_tokens=acts.n_tokens,
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
        context_start=ctx_start,
        context_stop=ctx_stop,
    )


# ---------------------------------------------------------------------------------- reading


class ActivationStore:
    """Read access to a store written by `write_store` / `cltrace harvest`."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def layers(self) -> list[int]:
        return self.manifest.layers

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def verify(self) -> list[str]:
        """Files of shards that are missing or fail their size/sha256 check (empty if all good)."""
        return [s.file for s in self.manifest.shards if not shard_ok(self.folder, s)]

    def load_shard(self, index: int) -> ActivationBatch:
        """One shard's tokens, in stored order."""
        from safetensors.torch import load_file

        rec = self.manifest.shards[index]
        try:
            tensors = load_file(str(self.folder / rec.file))
        except Exception as err:  # safetensors raises its own error types
            raise CltraceError(
                f"cannot read {self.folder / rec.file}: {err}",
                "rerun `cltrace harvest --resume` with the same --out to rebuild it",
            ) from err
        if tensors["mlp_in"].shape[0] != rec.n_tokens:
            raise CltraceError(
                f"{rec.file} holds {tensors['mlp_in'].shape[0]} tokens, the manifest says {rec.n_tokens}",
                "rerun `cltrace harvest --resume` with the same --out",
            )
        return ActivationBatch(tensors["mlp_in"], tensors["mlp_out"])

    def iter_batches(
        self, batch_tokens: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False, epochs: int = 1
    ) -> Iterator[ActivationBatch]:
        """Batches of `batch_tokens` tokens (storage dtype, CPU): `epochs` passes over the store.

        With `shuffle`, shards come in random order and tokens within each shard in random
        order, reshuffled every epoch (epoch e uses seed + e); batches run across epoch
        boundaries. Memory is one shard plus one batch.
        """
        if epochs < 1:
            raise CltraceError(f"epochs must be >= 1, got {epochs}")
        return rebatch(
            (chunk for e in range(epochs) for chunk in self._epoch(shuffle, seed + e)),
            batch_tokens,
            drop_last,
        )

    def _epoch(self, shuffle: bool, seed: int) -> Iterator[ActivationBatch]:
        gen = torch.Generator().manual_seed(seed)
        n = len(self.manifest.shards)
        order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
        return (self._shard_tokens(i, shuffle, gen) for i in order)

    def _shard_tokens(self, index: int, shuffle: bool, gen: torch.Generator) -> ActivationBatch:
        acts = self.load_shard(index)
        if not shuffle:
            return acts
        perm = torch.randperm(acts.n_tokens, generator=gen)
        return ActivationBatch(acts.mlp_in[perm], acts.mlp_out[perm])
