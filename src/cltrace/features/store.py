"""The feature store: what every transcoder feature reads and writes, in one SQLite file.

Built by `cltrace features RUN` (`features.build.build_feature_store`), read by
`cltrace feature RUN L:I`, the viewer and the supernode suggester (`FeatureStore`, here).

What is recorded per feature (layer l, index i), over held-out corpus text packed into
contexts of `context_len` tokens (BOS first where the family has one; position 0, the
attention sink, is never scored):

- the `top_k` highest activations and a sample across the activation range
  (`features.streaming`), activation density, mean and max activation;
- its direct effect on the logits: the tokens its decoder most promotes and suppresses
  (`features.effects`).

Tables: meta, progress, contexts (token ids of every context, int32), vocab (token strings),
features (one packed record per feature), layer_stats (counters per layer, blobs), effects,
auto_labels, user_labels, and the label scores (`features.label_store`). `user_labels` is
never written by a build, even with `fresh=True`.
Blobs are little-endian float32/int32 arrays; see `RecordLayout`.
"""

from __future__ import annotations

import array
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cltrace.errors import CltraceError
from cltrace.features import dashboard as dash
from cltrace.features.config import FeatureStoreConfig
from cltrace.features.label_store import (
    LABEL_SCHEMA,
    LABEL_TABLES,
    Order,
    label_evidence,
    label_info,
    label_summary,
    labels_table,
)
from cltrace.features.labels import DEFAULT_LABELS, LabelConfig

if TYPE_CHECKING:  # the moved names (see _MOVED, resolved lazily at run time), for type checkers
    from cltrace.features.build import BuildSummary, build_feature_store, iter_contexts
    from cltrace.features.effects import EFFECTS_METHOD, final_norm_gain, token_effects
    from cltrace.features.streaming import StreamingStats
    from cltrace.models.loading import LoadedModel
    from cltrace.transcoders.interface import TranscoderLike


SCHEMA_VERSION = 1
DB_FILENAME = "features.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS progress (id INTEGER PRIMARY KEY CHECK (id = 0),
    contexts INTEGER NOT NULL, tokens INTEGER NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (id INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS layer_stats (layer INTEGER PRIMARY KEY,
    n_fires BLOB NOT NULL, sum_act BLOB NOT NULL, max_act BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS effects (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS auto_labels (id INTEGER PRIMARY KEY, label TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS user_labels (layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    label TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (layer, feature));
CREATE INDEX IF NOT EXISTS auto_labels_by_label ON auto_labels (label);
CREATE INDEX IF NOT EXISTS user_labels_by_label ON user_labels (label);
"""
BUILD_TABLES = (
    "meta",
    "progress",
    "contexts",
    "vocab",
    "features",
    "layer_stats",
    "effects",
    "auto_labels",
    *LABEL_TABLES,
)


@dataclass(frozen=True)
class RecordLayout:
    """Packed per-feature record (4-byte words): top values f32[k], top locations i32[k],
    reservoir keys f32[r], reservoir values f32[r], reservoir locations i32[r], r = bins*per_bin.
    A location is `context_id * context_len + position`; -1 marks an empty slot."""

    top_k: int
    n_res: int

    @property
    def words(self) -> int:
        return 2 * self.top_k + 3 * self.n_res

    def unpack(self, blob: bytes) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
        """(top [(value, location)], reservoir [(value, location)]) without empty slots."""
        k, r = self.top_k, self.n_res
        f, i = _floats(blob), _ints(blob)
        top = [(f[j], i[k + j]) for j in range(k) if i[k + j] >= 0]
        res = [(f[2 * k + r + j], i[2 * k + 2 * r + j]) for j in range(r) if i[2 * k + 2 * r + j] >= 0]
        return sorted(top, key=lambda t: -t[0]), res


def _floats(blob: bytes) -> array.array:
    out = array.array("f", blob)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def _ints(blob: bytes) -> array.array:
    out = array.array("i", blob)
    if sys.byteorder == "big":
        out.byteswap()
    return out


class FeatureStore:
    """A feature store file. Reading needs neither torch nor numpy (fast dashboards).

    Args:
        path: the SQLite file (created, with its schema, when `create=True`).
        create: create the file when missing instead of raising.
    """

    def __init__(self, path: str | Path, *, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise CltraceError(
                f"no feature store at {self.path}",
                "build one with `cltrace features RUN` (see `cltrace features --help`)",
            )
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA + LABEL_SCHEMA)
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise CltraceError(
                f"{self.path} is not a feature store ({err})",
                "pass the features.sqlite that `cltrace features` wrote",
            ) from err
        self._meta: dict[str, str] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self):
        """`with store.transaction():` -- one atomic write (BEGIN IMMEDIATE ... COMMIT)."""
        return _Transaction(self)

    # -- metadata and progress -------------------------------------------------------------
    @property
    def meta(self) -> dict[str, str]:
        if self._meta is None:
            with self._lock:
                self._meta = dict(self.conn.execute("SELECT key, value FROM meta"))
        return self._meta

    def _int_meta(self, key: str) -> int:
        if key not in self.meta:
            raise CltraceError(
                f"{self.path} has no finished set-up (missing {key!r})",
                "rebuild it with `cltrace features RUN --fresh`",
            )
        return int(self.meta[key])

    @property
    def n_layers(self) -> int:
        return self._int_meta("n_layers")

    @property
    def n_features(self) -> int:
        return self._int_meta("n_features")

    @property
    def context_len(self) -> int:
        return self._int_meta("context_len")

    def progress(self) -> tuple[int, int]:
        """(contexts, tokens) scanned so far."""
        with self._lock:
            row = self.conn.execute("SELECT contexts, tokens FROM progress WHERE id = 0").fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def _fid(self, layer: int, index: int) -> int:
        if not (0 <= layer < self.n_layers and 0 <= index < self.n_features):
            raise CltraceError(
                f"no feature L{layer}:{index} in this store",
                f"layers 0..{self.n_layers - 1}, features 0..{self.n_features - 1}",
            )
        return layer * self.n_features + index

    # -- labels ----------------------------------------------------------------------------
    def label_scores(self, layer: int, index: int) -> dict | None:
        """The feature's label evidence and scores (`features.label_store.label_info`; None when
        the store has no scored labels for it), without reading its contexts."""
        fid = self._fid(layer, index)
        with self._lock:
            return label_info(self, fid)

    def user_label(self, layer: int, index: int) -> str | None:
        with self._lock:
            row = self.conn.execute(
                "SELECT label FROM user_labels WHERE layer = ? AND feature = ?", (layer, index)
            ).fetchone()
        return None if row is None else row[0]

    def label(self, layer: int, index: int) -> str:
        """The user's label if set, else the automatic one (computed on the fly if missing)."""
        user = self.user_label(layer, index)
        if user:
            return user
        with self._lock:
            row = self.conn.execute(
                "SELECT label FROM auto_labels WHERE id = ?", (self._fid(layer, index),)
            ).fetchone()
        return row[0] if row else self.dashboard(layer, index)["label"]

    def labels(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """Labels of many features at once (user labels win); features without one are left out."""
        keys = list(dict.fromkeys(keys))
        fids = {self._fid(l, i): (l, i) for l, i in keys}
        out: dict[tuple[int, int], str] = {}
        with self._lock:
            ids = sorted(fids)
            for s in range(0, len(ids), 500):
                part = ids[s : s + 500]
                out.update(
                    {
                        fids[int(i)]: lab
                        for i, lab in self.conn.execute(
                            f"SELECT id, label FROM auto_labels WHERE id IN ({','.join('?' * len(part))})",
                            part,
                        )
                    }
                )
            for layer, index, lab in self.conn.execute("SELECT layer, feature, label FROM user_labels"):
                if (layer, index) in fids.values():
                    out[(layer, index)] = lab
        return out

    def set_label(self, layer: int, index: int, label: str | None) -> None:
        """Set (or with None/"" clear) the user's label; builds never touch it."""
        self._fid(layer, index)
        with self.transaction():
            if label:
                self.conn.execute(
                    "INSERT INTO user_labels (layer, feature, label, updated) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (layer, feature) DO UPDATE SET label = excluded.label, "
                    "updated = excluded.updated",
                    (layer, index, label, time.time()),
                )
            else:
                self.conn.execute("DELETE FROM user_labels WHERE layer = ? AND feature = ?", (layer, index))

    def search(self, text: str, limit: int = 20) -> list[tuple[int, int, str]]:
        """Features whose label contains `text` (case-insensitive): [(layer, index, label)]."""
        pattern = f"%{text}%"
        F = self.n_features
        with self._lock:
            user = list(
                self.conn.execute(
                    "SELECT layer, feature, label FROM user_labels WHERE label LIKE ? LIMIT ?",
                    (pattern, limit),
                )
            )
            auto = [
                (i // F, i % F, lab)
                for i, lab in self.conn.execute(
                    "SELECT id, label FROM auto_labels WHERE label LIKE ? LIMIT ?", (pattern, limit)
                )
            ]
        seen = {(l, i) for l, i, _ in user}
        return (user + [a for a in auto if (a[0], a[1]) not in seen])[:limit]

    # -- reading one feature ---------------------------------------------------------------
    def record(self, layer: int, index: int) -> dash.FeatureRecord:
        """Everything stored about one feature (a handful of primary-key reads)."""
        fid = self._fid(layer, index)
        layout = RecordLayout(int(self.meta["top_k"]), int(self.meta["n_bins"]) * int(self.meta["per_bin"]))
        rec = dash.FeatureRecord(
            layer=layer, index=index, context_len=self.context_len, n_tokens=self.progress()[1]
        )
        with self._lock:
            row = self.conn.execute("SELECT data FROM features WHERE id = ?", (fid,)).fetchone()
            if row is not None:
                rec.top, rec.reservoir = layout.unpack(row[0])
            self._read_stats(rec)
            self._read_effects(rec, fid)
            lab = self.conn.execute("SELECT label FROM auto_labels WHERE id = ?", (fid,)).fetchone()
            rec.auto_label = lab[0] if lab else None
            rec.user_label = self.user_label(layer, index)
            rec.label_info = label_info(self, fid)
            self._read_contexts(rec)
        return rec

    def _blob_slice(self, column: str, layer: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of one layer_stats blob (`column` is one of the table's own)."""
        if sys.version_info >= (3, 11):  # incremental blob I/O: reads only those bytes
            with self.conn.blobopen("layer_stats", column, layer, readonly=True) as blob:
                blob.seek(offset)
                return blob.read(size)
        row = self.conn.execute(
            f"SELECT substr({column}, ?, ?) FROM layer_stats WHERE layer = ?", (offset + 1, size, layer)
        ).fetchone()
        return bytes(row[0])

    def _read_stats(self, rec: dash.FeatureRecord) -> None:
        """Counters for one feature, read at an offset inside the layer's blobs."""
        exists = self.conn.execute("SELECT 1 FROM layer_stats WHERE layer = ?", (rec.layer,)).fetchone()
        if exists is None:
            return
        values = []
        for column, code in (("n_fires", "q"), ("sum_act", "d"), ("max_act", "f")):
            size = array.array(code).itemsize
            item = array.array(code, self._blob_slice(column, rec.layer, rec.index * size, size))
            if sys.byteorder == "big":
                item.byteswap()
            values.append(item[0])
        rec.n_fires, rec.sum_activation, rec.max_activation = int(values[0]), values[1], values[2]

    def _read_effects(self, rec: dash.FeatureRecord, fid: int) -> None:
        row = self.conn.execute("SELECT data FROM effects WHERE id = ?", (fid,)).fetchone()
        if row is None:
            return
        n = len(row[0]) // 16  # ids i32[n], values f32[n], for promoted then suppressed
        ints, floats = _ints(row[0]), _floats(row[0])
        rec.promoted = [(ints[j], floats[n + j]) for j in range(n)]
        rec.suppressed = [(ints[2 * n + j], floats[3 * n + j]) for j in range(n)]

    def _read_contexts(self, rec: dash.FeatureRecord) -> None:
        ctx_ids = sorted({loc // rec.context_len for loc in rec.locations()})
        if ctx_ids:
            marks = ",".join("?" * len(ctx_ids))
            for cid, blob in self.conn.execute(
                f"SELECT id, tokens FROM contexts WHERE id IN ({marks})", ctx_ids
            ):
                rec.contexts[int(cid)] = list(_ints(blob))
        ids = {t for toks in rec.contexts.values() for t in toks}
        ids |= {t for t, _ in rec.promoted} | {t for t, _ in rec.suppressed}
        if ids:
            ids_list = sorted(ids)
            marks = ",".join("?" * len(ids_list))
            rec.vocab = dict(self.conn.execute(f"SELECT id, text FROM vocab WHERE id IN ({marks})", ids_list))

    def labels_table(
        self,
        *,
        min_score: float | None = None,
        min_output: float | None = None,
        order: Order = "score",
        limit: int | None = None,
        include_broad: bool = False,
    ) -> list[dict]:
        """Labelled features with scores, sorted and filtered (`features.label_store.labels_table`)."""
        with self._lock:
            return labels_table(
                self,
                min_score=min_score,
                min_output=min_output,
                order=order,
                limit=limit,
                include_broad=include_broad,
            )

    def label_evidence(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], tuple[list, list]]:
        """{(layer, index): (read texts, written texts)} (`features.label_store.label_evidence`)."""
        with self._lock:
            return label_evidence(self, list(keys))

    def label_summary(self) -> dict | None:
        """Score distributions of all labels and of shuffled labels (None before scored labels)."""
        return label_summary(self)

    def dashboard(
        self, layer: int, index: int, *, before: int = 12, after: int = 4, n_top: int | None = None
    ) -> dict:
        """The feature's dashboard card (JSON-able; keys in `features.dashboard`)."""
        rec = self.record(layer, index)
        return dash.assemble(
            rec,
            n_bins=int(self.meta["n_bins"]),
            per_bin=int(self.meta["per_bin"]),
            before=before,
            after=after,
            n_top=n_top,
        )


class _Transaction:
    def __init__(self, store: FeatureStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.store.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.store.conn

    def __exit__(self, exc_type, *_):
        try:
            self.store.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()


def add_vocab(conn: sqlite3.Connection, model: "LoadedModel", ids: set[int]) -> None:
    """Store the display string of each token id not stored yet."""
    if not ids:
        return
    have = (
        {
            r[0]
            for r in conn.execute(
                f"SELECT id FROM vocab WHERE id IN ({','.join('?' * len(ids))})", sorted(ids)
            )
        }
        if len(ids) < 30000
        else {r[0] for r in conn.execute("SELECT id FROM vocab")}
    )
    missing = sorted(ids - have)
    conn.executemany("INSERT INTO vocab (id, text) VALUES (?, ?)", zip(missing, model.token_strings(missing)))


def write_auto_labels(
    store: FeatureStore,
    config: LabelConfig = DEFAULT_LABELS,
    *,
    model: "LoadedModel | None" = None,
    transcoder: TranscoderLike | None = None,
    score_output: int | None = 0,
    show_progress: bool = False,
) -> int:
    """(Re)compute every automatic label and its scores from the stored data (no rescan);
    returns the count. With a model and transcoder the held-out pool is made when missing and
    `score_output` features get output scores (`features.label_store.relabel`)."""
    from cltrace.features.label_store import relabel

    return relabel(
        store,
        config,
        model=model,
        transcoder=transcoder,
        score_output=score_output,
        show_progress=show_progress,
    ).n_features


# Names that lived here before the build was split out stay importable from here (compatibility);
# resolved on first use, since those modules import FeatureStore from here.
_MOVED = {
    "BuildSummary": "build",
    "build_feature_store": "build",
    "iter_contexts": "build",
    "EFFECTS_METHOD": "effects",
    "final_norm_gain": "effects",
    "token_effects": "effects",
    "StreamingStats": "streaming",
}

__all__ = [
    "FeatureStore",
    "FeatureStoreConfig",
    "RecordLayout",
    "add_vocab",
    "write_auto_labels",
    "SCHEMA",
    "SCHEMA_VERSION",
    "DB_FILENAME",
    "BUILD_TABLES",
    # the names of _MOVED, spelled out (and imported when type checking) for type checkers
    "BuildSummary",
    "build_feature_store",
    "iter_contexts",
    "EFFECTS_METHOD",
    "final_norm_gain",
    "token_effects",
    "StreamingStats",
]


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"cltrace.features.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
