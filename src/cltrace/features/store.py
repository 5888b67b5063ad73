"""The feature store: what every transcoder feature reads and writes, in one SQLite file.

Built by `cltrace features RUN` (`build_feature_store`), read by `cltrace feature RUN L:I`,
the viewer and the supernode suggester (`FeatureStore`).

What is recorded per feature (layer l, index i), over held-out corpus text packed into
contexts of `context_len` tokens (BOS first where the family has one; position 0, the
attention sink, is never scored):

- the `top_k` highest activations: value and location (context id, position);
- examples across the activation range: the range (0, max] is cut into `n_bins` equal
  slices and each slice keeps a uniform random sample of `per_bin` examples (reservoir
  sampling by random priority keys, so it merges like a top-k). Slices follow the *running*
  max, so when the max grows, earlier samples are re-binned and the sample is approximate;
- activation density (tokens where it fires / tokens scanned), mean and max activation;
- its direct effect on the logits: the tokens its decoder most promotes and suppresses.
  The decoder direction is the *sum over its target layers* Σ_{l'≥l} W_dec_{l→l'} (a CLT
  feature writes to every later MLP output, and all of them reach the residual stream at the
  top), multiplied by the final norm's gain and the unembedding. The final norm's per-token
  denominator is a positive scale and logit soft-capping is monotonic, so the ranking is
  exact; values are logit changes per unit of activation before that scale.

Building streams: each batch's activations are merged into running buffers on the
transcoder's device (`torch.topk` over [buffer; batch] for the top-k, a segmented sort for
the reservoirs), so memory is O(L·F·(k + bins·per_bin)) whatever the corpus size. Every
`flush_tokens` tokens, in one transaction, the contexts read, the buffers of features that
changed, the per-layer counters and the progress row are written; a build that stops (or is
killed) restarts from the last flush and produces the same store as an uninterrupted one.

Tables: meta, progress, contexts (token ids of every context, int32), vocab (token strings),
features (one packed record per feature), layer_stats (counters per layer, blobs), effects,
auto_labels, user_labels. `user_labels` is never written by a build, even with `fresh=True`.
Blobs are little-endian float32/int32 arrays; see `RecordLayout`.
"""

from __future__ import annotations

import array
import itertools
import json
import sqlite3
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from cltrace.errors import CltraceError
from cltrace.features import dashboard as dash
from cltrace.features.labels import DEAD_LABEL, auto_label

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

    from cltrace.models.loading import LoadedModel

SCHEMA_VERSION = 1
DB_FILENAME = "features.sqlite"
EFFECTS_METHOD = "sum over target layers of W_dec, times final-norm gain, times W_U"

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
BUILD_TABLES = ("meta", "progress", "contexts", "vocab", "features", "layer_stats", "effects",
                "auto_labels")


@dataclass(frozen=True)
class FeatureStoreConfig:
    """How a feature store is built. Saved in its meta table; a resumed build must match."""

    context_len: int = 64          # tokens per context, BOS included; position 0 is not scored
    top_k: int = 20                # top activating examples kept per feature
    n_bins: int = 5                # slices of the activation range for the spread of examples
    per_bin: int = 4               # random examples kept per slice
    n_effects: int = 10            # promoted and suppressed tokens kept per feature
    batch_contexts: int = 8        # contexts per model forward
    encode_elems: int = 2**25      # max tokens*L*F activations materialised at once
    flush_tokens: int = 32768      # write to the database every this many tokens
    seed: int = 0                  # reservoir sampling seed

    def __post_init__(self) -> None:
        if self.context_len < 2:
            raise ValueError("context_len must be at least 2 (position 0 is not scored)")
        if min(self.top_k, self.n_bins, self.per_bin, self.batch_contexts, self.flush_tokens) < 1:
            raise ValueError("top_k, n_bins, per_bin, batch_contexts and flush_tokens must be >= 1")

    def identity(self) -> dict:
        """The fields that change what is stored (a resumed build must agree on them)."""
        return {k: v for k, v in asdict(self).items()
                if k in ("context_len", "top_k", "n_bins", "per_bin", "n_effects", "seed")}


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
            raise CltraceError(f"no feature store at {self.path}",
                               "build one with `cltrace features RUN` (see `cltrace features --help`)")
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise CltraceError(f"{self.path} is not a feature store ({err})",
                               "pass the features.sqlite that `cltrace features` wrote") from err
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
            raise CltraceError(f"{self.path} has no finished set-up (missing {key!r})",
                               "rebuild it with `cltrace features RUN --fresh`")
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
            raise CltraceError(f"no feature L{layer}:{index} in this store",
                               f"layers 0..{self.n_layers - 1}, features 0..{self.n_features - 1}")
        return layer * self.n_features + index

    # -- labels ----------------------------------------------------------------------------
    def user_label(self, layer: int, index: int) -> str | None:
        with self._lock:
            row = self.conn.execute("SELECT label FROM user_labels WHERE layer = ? AND feature = ?",
                                    (layer, index)).fetchone()
        return None if row is None else row[0]

    def label(self, layer: int, index: int) -> str:
        """The user's label if set, else the automatic one (computed on the fly if missing)."""
        user = self.user_label(layer, index)
        if user:
            return user
        with self._lock:
            row = self.conn.execute("SELECT label FROM auto_labels WHERE id = ?",
                                    (self._fid(layer, index),)).fetchone()
        return row[0] if row else self.dashboard(layer, index)["label"]

    def labels(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """Labels of many features at once (user labels win); features without one are left out."""
        keys = list(dict.fromkeys(keys))
        fids = {self._fid(l, i): (l, i) for l, i in keys}
        out: dict[tuple[int, int], str] = {}
        with self._lock:
            ids = sorted(fids)
            for s in range(0, len(ids), 500):
                part = ids[s:s + 500]
                out.update({fids[int(i)]: lab for i, lab in self.conn.execute(
                    f"SELECT id, label FROM auto_labels WHERE id IN ({','.join('?' * len(part))})", part)})
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
                    "updated = excluded.updated", (layer, index, label, time.time()))
            else:
                self.conn.execute("DELETE FROM user_labels WHERE layer = ? AND feature = ?",
                                  (layer, index))

    def search(self, text: str, limit: int = 20) -> list[tuple[int, int, str]]:
        """Features whose label contains `text` (case-insensitive): [(layer, index, label)]."""
        pattern = f"%{text}%"
        F = self.n_features
        with self._lock:
            user = list(self.conn.execute(
                "SELECT layer, feature, label FROM user_labels WHERE label LIKE ? LIMIT ?", (pattern, limit)))
            auto = [(i // F, i % F, lab) for i, lab in self.conn.execute(
                "SELECT id, label FROM auto_labels WHERE label LIKE ? LIMIT ?", (pattern, limit))]
        seen = {(l, i) for l, i, _ in user}
        return (user + [a for a in auto if (a[0], a[1]) not in seen])[:limit]

    # -- reading one feature ---------------------------------------------------------------
    def record(self, layer: int, index: int) -> dash.FeatureRecord:
        """Everything stored about one feature (a handful of primary-key reads)."""
        fid = self._fid(layer, index)
        layout = RecordLayout(int(self.meta["top_k"]), int(self.meta["n_bins"]) * int(self.meta["per_bin"]))
        rec = dash.FeatureRecord(layer=layer, index=index, context_len=self.context_len,
                                 n_tokens=self.progress()[1])
        with self._lock:
            row = self.conn.execute("SELECT data FROM features WHERE id = ?", (fid,)).fetchone()
            if row is not None:
                rec.top, rec.reservoir = layout.unpack(row[0])
            self._read_stats(rec)
            self._read_effects(rec, fid)
            lab = self.conn.execute("SELECT label FROM auto_labels WHERE id = ?", (fid,)).fetchone()
            rec.auto_label = lab[0] if lab else None
            rec.user_label = self.user_label(layer, index)
            self._read_contexts(rec)
        return rec

    def _read_stats(self, rec: dash.FeatureRecord) -> None:
        """Counters for one feature, read at an offset inside the layer's blobs."""
        exists = self.conn.execute("SELECT 1 FROM layer_stats WHERE layer = ?", (rec.layer,)).fetchone()
        if exists is None:
            return
        values = []
        for column, code in (("n_fires", "q"), ("sum_act", "d"), ("max_act", "f")):
            size = array.array(code).itemsize
            with self.conn.blobopen("layer_stats", column, rec.layer, readonly=True) as blob:
                blob.seek(rec.index * size)
                item = array.array(code, blob.read(size))
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
            for cid, blob in self.conn.execute(f"SELECT id, tokens FROM contexts WHERE id IN ({marks})", ctx_ids):
                rec.contexts[int(cid)] = list(_ints(blob))
        ids = {t for toks in rec.contexts.values() for t in toks}
        ids |= {t for t, _ in rec.promoted} | {t for t, _ in rec.suppressed}
        if ids:
            ids_list = sorted(ids)
            marks = ",".join("?" * len(ids_list))
            rec.vocab = dict(self.conn.execute(f"SELECT id, text FROM vocab WHERE id IN ({marks})", ids_list))

    def dashboard(self, layer: int, index: int, *, before: int = 12, after: int = 4,
                  n_top: int | None = None) -> dict:
        """The feature's dashboard card (JSON-able; keys in `features.dashboard`)."""
        rec = self.record(layer, index)
        return dash.assemble(rec, n_bins=int(self.meta["n_bins"]), per_bin=int(self.meta["per_bin"]),
                             before=before, after=after, n_top=n_top)


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


# ======================================================================================
# Building
# ======================================================================================

@dataclass(frozen=True)
class BuildSummary:
    """What one `build_feature_store` call did."""

    path: Path
    tokens: int              # tokens scanned in total (all calls)
    tokens_this_run: int
    seconds: float           # wall time of this call (effects included)
    scan_seconds: float      # time spent scanning tokens in this call
    db_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.scan_seconds if self.scan_seconds > 0 else float("nan")


def iter_contexts(model: "LoadedModel", documents: Iterable[str], context_len: int) -> Iterator[list[int]]:
    """Pack documents (EOS between them) into contexts of `context_len` token ids, BOS first.

    Deterministic, so a resumed build skips the contexts it has done. A final partial
    context is dropped.
    """
    tok = model.tokenizer
    prefix = [model.bos_token_id] if model.bos_token_id is not None else []
    eos = getattr(tok, "eos_token_id", None)
    body = context_len - len(prefix)
    buf: list[int] = []
    for doc in documents:
        buf.extend(tok(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buf.append(eos)
        while len(buf) >= body:
            yield prefix + buf[:body]
            del buf[:body]


def _check_or_write_meta(store: FeatureStore, wanted: dict[str, str]) -> None:
    """Write the build's identity on first use; refuse to resume a different one."""
    have = store.meta
    if not have:
        with store.transaction() as conn:
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", wanted.items())
        store._meta = None
        return
    clash = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    if clash:
        what = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(clash.items()))
        raise CltraceError(f"{store.path} was built with different settings ({what})",
                           "pass --fresh to rebuild it (your labels are kept), or --db for another file")


def _clear_build(store: FeatureStore) -> None:
    """Delete everything a build wrote; user labels stay."""
    with store.transaction() as conn:
        for table in BUILD_TABLES:
            conn.execute(f"DELETE FROM {table}")
    store._meta = None
    store.conn.execute("VACUUM")


def final_norm_gain(model: "LoadedModel") -> "Tensor":
    """The final norm's elementwise gain [d] (Gemma stores weight - 1)."""
    import torch

    norm = model.adapter.final_norm(model.model)
    if getattr(norm, "weight", None) is None:
        return torch.ones(model.d_model)
    weight = norm.weight.detach().float()
    return 1.0 + weight if model.adapter.norm_kind == "rms_plus_one" else weight


def token_effects(model: "LoadedModel", transcoder, layer: int, n: int,
                  chunk_elems: int = 2**24) -> tuple["Tensor", "Tensor", "Tensor", "Tensor"]:
    """Top and bottom `n` tokens by direct logit effect for every feature of `layer`.

    Returns (promoted ids [F, n], promoted values [F, n], suppressed ids, suppressed values),
    values as described in the module docstring (sum over target layers).
    """
    import torch

    with torch.no_grad():
        w_dec = transcoder.decoder_weight(layer).float().sum(1)          # [F, d]
        unembed = model.adapter.unembed(model.model).weight              # [V, d]
        dirs = (w_dec.to(unembed.device) * final_norm_gain(model).to(unembed.device))  # [F, d]
        chunk = max(1, chunk_elems // unembed.shape[0])
        outs = [[], [], [], []]
        for start in range(0, dirs.shape[0], chunk):
            logits = dirs[start:start + chunk].to(unembed.dtype) @ unembed.T   # [c, V]
            hi, lo = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
            for lst, t in zip(outs, (hi.indices, hi.values.float(), lo.indices, lo.values.float())):
                lst.append(t.cpu())
    return tuple(torch.cat(t) for t in outs)


def _write_effects(store: FeatureStore, model: "LoadedModel", transcoder, cfg: FeatureStoreConfig,
                   show_progress: bool) -> None:
    """Compute and store token effects for each layer not done yet (resumable per layer)."""
    import numpy as np

    from cltrace.progress import progress

    done = set(json.loads(store.meta.get("effects_layers_done", "[]")))
    todo = [l for l in range(store.n_layers) if l not in done]
    F = store.n_features
    for layer in progress(todo, desc="token effects", unit="layer", disable=None if show_progress else True):
        p_ids, p_val, s_ids, s_val = token_effects(model, transcoder, layer, cfg.n_effects)
        packed = np.concatenate([p_ids.numpy().astype("<i4").view("<u4"), p_val.numpy().astype("<f4").view("<u4"),
                                 s_ids.numpy().astype("<i4").view("<u4"), s_val.numpy().astype("<f4").view("<u4")],
                                axis=1)                                   # [F, 4n] words
        new_ids = set(np.unique(np.concatenate([p_ids.numpy().ravel(), s_ids.numpy().ravel()])).tolist())
        done.add(layer)
        with store.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO effects (id, data) VALUES (?, ?)",
                             ((layer * F + f, packed[f].tobytes()) for f in range(F)))
            _add_vocab(conn, model, new_ids)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('effects_layers_done', ?)",
                         (json.dumps(sorted(done)),))
        store._meta = None


def _add_vocab(conn: sqlite3.Connection, model: "LoadedModel", ids: set[int]) -> None:
    """Store the display string of each token id not stored yet."""
    if not ids:
        return
    have = {r[0] for r in conn.execute(
        f"SELECT id FROM vocab WHERE id IN ({','.join('?' * len(ids))})", sorted(ids))} \
        if len(ids) < 30000 else {r[0] for r in conn.execute("SELECT id FROM vocab")}
    missing = sorted(ids - have)
    conn.executemany("INSERT INTO vocab (id, text) VALUES (?, ?)",
                     zip(missing, model.token_strings(missing)))


class StreamingStats:
    """Running per-feature buffers on the transcoder's device, merged batch by batch.

    Shapes: top_val/top_loc [L, k, F]; res_key/res_val/res_loc [L, F, bins, per_bin];
    n_fires/sum_act/max_act [L, F]. Empty slots: value 0 / key -1 / location -1.
    """

    def __init__(self, n_layers: int, n_features: int, cfg: FeatureStoreConfig, device: "torch.device"):
        import torch

        L, F, k, B, m = n_layers, n_features, cfg.top_k, cfg.n_bins, cfg.per_bin
        self.cfg, self.L, self.F, self.device = cfg, L, F, device
        self.top_val = torch.zeros(L, k, F, device=device)
        self.top_loc = torch.full((L, k, F), -1, dtype=torch.int32, device=device)
        self.res_key = torch.full((L, F, B, m), -1.0, device=device)
        self.res_val = torch.zeros(L, F, B, m, device=device)
        self.res_loc = torch.full((L, F, B, m), -1, dtype=torch.int32, device=device)
        self.n_fires = torch.zeros(L, F, dtype=torch.int64, device=device)
        self.sum_act = torch.zeros(L, F, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(L, F, device=device)
        self.mark_clean()

    def mark_clean(self) -> None:
        """Remember the current buffers, to find the features that change before the next flush."""
        self._snap_top, self._snap_res = self.top_loc.clone(), self.res_loc.clone()

    def changed(self) -> "Tensor":
        """[L, F] bool: features whose examples changed since `mark_clean`."""
        return ((self.top_loc != self._snap_top).any(1)
                | (self.res_loc != self._snap_res).flatten(2).any(2))

    def update(self, acts: "Tensor", loc: "Tensor", seed: int) -> None:
        """Merge one slice of activations.

        Args:
            acts: [N, L, F] feature activations (>= 0) of N tokens.
            loc: [N] int32 global locations of those tokens.
            seed: seeds the reservoir keys (per slice, so resumed builds repeat them).
        """
        import torch

        gen = torch.Generator(device=acts.device).manual_seed(seed)
        by_layer = acts.float().transpose(0, 1).contiguous()             # [L, N, F]
        for layer in range(self.L):
            a = by_layer[layer]                                          # [N, F]
            fired = a > 0
            peak = a.max(0).values                                       # [F]
            self.n_fires[layer] += fired.sum(0)
            self.sum_act[layer] += a.sum(0).double()
            self.max_act[layer] = torch.maximum(self.max_act[layer], peak)
            self._merge_top(layer, a, peak, loc)
            self._merge_reservoir(layer, a, fired, loc, gen)

    def _merge_top(self, layer: int, a: "Tensor", peak: "Tensor", loc: "Tensor") -> None:
        """Top-k over [buffer; batch] along the token axis, for the features whose batch
        maximum beats their current k-th value (after warm-up, few do)."""
        import torch

        k = self.cfg.top_k
        feats = (peak > self.top_val[layer, -1]).nonzero().squeeze(1)   # buffers are sorted
        if feats.numel() == 0:
            return
        old_val, old_loc = self.top_val[layer][:, feats], self.top_loc[layer][:, feats]
        val, idx = torch.cat([old_val, a[:, feats]], 0).topk(k, dim=0)   # [k, f]
        new_loc = torch.where(idx < k, old_loc.gather(0, idx.clamp(max=k - 1)), loc[(idx - k).clamp(min=0)])
        self.top_val[layer][:, feats] = val
        self.top_loc[layer][:, feats] = torch.where(val > 0, new_loc, torch.full_like(new_loc, -1))

    def _merge_reservoir(self, layer: int, a: "Tensor", fired: "Tensor", loc: "Tensor",
                         gen: "torch.Generator") -> None:
        """Keep, per (feature, slice of its range), the `per_bin` entries with the largest
        random keys among the stored ones and this slice's activations of fired features."""
        import torch

        B, m = self.cfg.n_bins, self.cfg.per_bin
        tok_i, feat_i = fired.nonzero(as_tuple=True)
        if feat_i.numel() == 0:
            return
        fids = torch.unique(feat_i)                                      # features to redo
        old_key = self.res_key[layer, fids]                              # [f, B, m]
        keep_old = old_key >= 0
        feats = torch.cat([fids[:, None, None].expand_as(keep_old)[keep_old], feat_i])
        vals = torch.cat([self.res_val[layer, fids][keep_old], a[tok_i, feat_i]])
        locs = torch.cat([self.res_loc[layer, fids][keep_old], loc[tok_i]])
        keys = torch.cat([old_key[keep_old],
                          torch.rand(feat_i.numel(), generator=gen, device=a.device)])
        bins = (vals / self.max_act[layer, feats] * B).long().clamp(0, B - 1)
        group = feats * B + bins
        order = torch.argsort(group.double() + (1.0 - keys.double()) * 0.5, stable=True)  # group, key desc
        group = group[order]
        _, counts = torch.unique_consecutive(group, return_counts=True)
        starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        rank = torch.arange(group.numel(), device=a.device) - starts
        sel = rank < m
        g, r, o = group[sel], rank[sel], order[sel]
        self.res_key[layer, fids], self.res_val[layer, fids], self.res_loc[layer, fids] = -1.0, 0.0, -1
        self.res_key[layer].view(-1, m)[g, r] = keys[o]
        self.res_val[layer].view(-1, m)[g, r] = vals[o]
        self.res_loc[layer].view(-1, m)[g, r] = locs[o]

    # -- persistence -----------------------------------------------------------------------
    def records(self, layer: int, feats: "Tensor") -> "np.ndarray":
        """Packed records (see RecordLayout) of some features of one layer: [n, words] uint32."""
        import numpy as np

        idx = feats.to(self.device)
        parts = [self.top_val[layer][:, idx].T, self.top_loc[layer][:, idx].T,
                 self.res_key[layer, idx].flatten(1), self.res_val[layer, idx].flatten(1),
                 self.res_loc[layer, idx].flatten(1)]
        arrays = [p.contiguous().cpu().numpy() for p in parts]
        return np.concatenate([x.astype("<f4" if x.dtype.kind == "f" else "<i4").view("<u4")
                               for x in arrays], axis=1)

    def load_records(self, ids: "np.ndarray", words: "np.ndarray") -> None:
        """Inverse of `records` for rows [(layer*F + feature)] read back from the database."""
        import torch

        k, B, m = self.cfg.top_k, self.cfg.n_bins, self.cfg.per_bin
        r = B * m
        layer = torch.from_numpy(ids // self.F).to(self.device)
        feat = torch.from_numpy(ids % self.F).to(self.device)
        f32 = torch.from_numpy(words.view("<f4").astype("float32")).to(self.device)
        i32 = torch.from_numpy(words.view("<i4").astype("int32")).to(self.device)
        self.top_val[layer, :, feat] = f32[:, :k]
        self.top_loc[layer, :, feat] = i32[:, k:2 * k]
        self.res_key[layer, feat] = f32[:, 2 * k:2 * k + r].view(-1, B, m)
        self.res_val[layer, feat] = f32[:, 2 * k + r:2 * k + 2 * r].view(-1, B, m)
        self.res_loc[layer, feat] = i32[:, 2 * k + 2 * r:].view(-1, B, m)

    def stats_blobs(self, layer: int) -> tuple[bytes, bytes, bytes]:
        return (self.n_fires[layer].cpu().numpy().astype("<i8").tobytes(),
                self.sum_act[layer].cpu().numpy().astype("<f8").tobytes(),
                self.max_act[layer].cpu().numpy().astype("<f4").tobytes())

    def load_stats(self, layer: int, n_fires: bytes, sum_act: bytes, max_act: bytes) -> None:
        import numpy as np
        import torch

        self.n_fires[layer] = torch.from_numpy(np.frombuffer(n_fires, "<i8").astype("int64")).to(self.device)
        self.sum_act[layer] = torch.from_numpy(np.frombuffer(sum_act, "<f8").astype("float64")).to(self.device)
        self.max_act[layer] = torch.from_numpy(np.frombuffer(max_act, "<f4").astype("float32")).to(self.device)

    @classmethod
    def from_store(cls, store: FeatureStore, cfg: FeatureStoreConfig, device: "torch.device") -> "StreamingStats":
        """The buffers as of the store's last flush (empty for a new store)."""
        import numpy as np

        state = cls(store.n_layers, store.n_features, cfg, device)
        rows = store.conn.execute("SELECT id, data FROM features ORDER BY id").fetchall()
        if rows:
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            words = np.frombuffer(b"".join(r[1] for r in rows), "<u4").reshape(len(rows), -1)
            state.load_records(ids, words)
        for layer, *blobs in store.conn.execute("SELECT layer, n_fires, sum_act, max_act FROM layer_stats"):
            state.load_stats(int(layer), *blobs)
        state.mark_clean()
        return state


def _device_dtype(transcoder) -> tuple["torch.device", "torch.dtype"]:
    import torch

    try:
        p = next(iter(transcoder.parameters()))
        return p.device, p.dtype
    except (AttributeError, StopIteration):
        return torch.device("cpu"), torch.float32


class _Builder:
    """One build call: scan contexts, merge, flush. Holds what is pending between flushes."""

    def __init__(self, store: FeatureStore, model: "LoadedModel", transcoder, cfg: FeatureStoreConfig):
        self.store, self.model, self.tc, self.cfg = store, model, transcoder, cfg
        self.device, self.dtype = _device_dtype(transcoder)
        self.state = StreamingStats.from_store(store, cfg, self.device)
        self.contexts_done, self.tokens_done = store.progress()
        self.pending: list[tuple[int, list[int]]] = []
        self.pending_tokens = 0
        self.consistent = True   # False while a batch is half merged: never flush then

    def scan(self, contexts: list[list[int]]) -> None:
        """Run the model and the transcoder on a batch of contexts and merge the activations."""
        import torch

        first = self.contexts_done
        n = self.cfg.context_len
        self.consistent = False
        tokens = torch.tensor(contexts, dtype=torch.long, device=self.model.device)   # [B, n]
        x = self.model.capture(tokens).mlp_in[:, 1:]                                   # [B, n-1, L, d]
        x = x.reshape(-1, *x.shape[2:]).to(self.device, self.dtype)                   # [N, L, d]
        ctx = torch.arange(first, first + len(contexts), device=self.device)
        pos = torch.arange(1, n, device=self.device)
        loc = (ctx[:, None] * n + pos[None, :]).reshape(-1).to(torch.int32)           # [N]
        per = max(1, self.cfg.encode_elems // (self.store.n_layers * self.store.n_features))
        with torch.no_grad():
            for s in range(0, x.shape[0], per):
                acts = self.tc.activate(self.tc.encode(x[s:s + per]))                 # [n_s, L, F]
                self.state.update(acts, loc[s:s + per], seed=self.cfg.seed * 1_000_003 + first * 997 + s)
        self.pending += list(zip(range(first, first + len(contexts)), contexts))
        self.contexts_done += len(contexts)
        self.tokens_done += x.shape[0]
        self.pending_tokens += x.shape[0]
        self.consistent = True

    def flush(self) -> None:
        """Write everything since the last flush in one transaction."""
        import numpy as np

        changed = self.state.changed()
        F = self.store.n_features
        with self.store.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO contexts (id, tokens) VALUES (?, ?)",
                             ((cid, np.asarray(t, "<i4").tobytes()) for cid, t in self.pending))
            _add_vocab(conn, self.model, {t for _, toks in self.pending for t in toks})
            for layer in range(self.store.n_layers):
                feats = changed[layer].nonzero().squeeze(1).cpu()
                if feats.numel():
                    recs = self.state.records(layer, feats)
                    conn.executemany("INSERT OR REPLACE INTO features (id, data) VALUES (?, ?)",
                                     ((layer * F + int(f), recs[j].tobytes()) for j, f in enumerate(feats)))
                conn.execute("INSERT OR REPLACE INTO layer_stats (layer, n_fires, sum_act, max_act) "
                             "VALUES (?, ?, ?, ?)", (layer, *self.state.stats_blobs(layer)))
            conn.execute("INSERT OR REPLACE INTO progress (id, contexts, tokens, updated) VALUES (0, ?, ?, ?)",
                         (self.contexts_done, self.tokens_done, time.time()))
        self.state.mark_clean()
        self.pending, self.pending_tokens = [], 0


def write_auto_labels(store: FeatureStore) -> int:
    """(Re)compute the automatic label of every feature from the stored data; returns the count."""
    import numpy as np

    n = store.context_len
    layout = RecordLayout(int(store.meta["top_k"]), int(store.meta["n_bins"]) * int(store.meta["per_bin"]))
    conn = store.conn
    tops = [(int(fid), layout.unpack(blob)[0]) for fid, blob in conn.execute("SELECT id, data FROM features")]
    ctx_tokens = {int(i): np.frombuffer(b, "<i4") for i, b in conn.execute("SELECT id, tokens FROM contexts")}
    vocab = dict(conn.execute("SELECT id, text FROM vocab"))
    effects = {int(i): np.frombuffer(b, "<i4")[: len(b) // 16] for i, b in conn.execute("SELECT id, data FROM effects")}
    # a label names a promoted token that occurs in the scanned text, when one of the top ones does
    # (Gemma's 262k vocabulary lets rare foreign sub-words top the raw list of a weak feature)
    seen = set(np.unique(np.concatenate(list(ctx_tokens.values()))).tolist()) if ctx_tokens else set()
    labels = []
    for fid, top in tops:
        active = [vocab.get(int(ctx_tokens[loc // n][loc % n]), "") for _, loc in top if loc // n in ctx_tokens]
        ids = [int(t) for t in effects.get(fid, ())]
        promoted = [vocab.get(t, "") for t in ([t for t in ids if t in seen] or ids)]
        labels.append((fid, auto_label(active, promoted) if top else DEAD_LABEL))
    with store.transaction() as c:
        c.execute("DELETE FROM auto_labels")
        c.executemany("INSERT INTO auto_labels (id, label) VALUES (?, ?)", labels)
    return len(labels)


def build_feature_store(path: str | Path, model: "LoadedModel", transcoder, *,
                        documents: Iterable[str] | None = None,
                        config: FeatureStoreConfig = FeatureStoreConfig(),
                        max_tokens: int | None = None, fresh: bool = False,
                        model_id: str | None = None, transcoder_id: str | None = None,
                        effects: bool = True, show_progress: bool = True) -> BuildSummary:
    """Build or continue a feature store.

    Args:
        path: SQLite file to create or continue.
        model: the language model the transcoder was trained on.
        transcoder: a `Transcoder` (encode/activate/decoder_weight, raw scale).
        documents: texts to scan; default: the held-out split of the corpus.
        config: what to record; must match the stored one when continuing.
        max_tokens: stop once this many tokens (in total, over all calls) are scanned;
            None: the whole corpus.
        fresh: delete a previous build first (user labels are kept).
        model_id, transcoder_id: recorded in meta; a continued build must name the same.
        effects: compute promoted/suppressed tokens (one matmul with the unembedding per layer).
    """
    from cltrace.progress import progress

    t0 = time.perf_counter()
    store = FeatureStore(path, create=True)
    try:
        if fresh:
            _clear_build(store)
        wanted = {"schema_version": SCHEMA_VERSION, "model": model_id or model.name,
                  "transcoder": transcoder_id or "in-memory", "n_layers": model.n_layers,
                  "n_features": _n_features(transcoder), "effects_method": EFFECTS_METHOD,
                  **config.identity()}
        _check_or_write_meta(store, {k: str(v) for k, v in wanted.items()})
        if effects:
            _write_effects(store, model, transcoder, config, show_progress)
        builder = _Builder(store, model, transcoder, config)
        start_tokens = builder.tokens_done
        t_scan = time.perf_counter()
        _scan_all(builder, documents, max_tokens, show_progress, progress)
        scan_seconds = time.perf_counter() - t_scan
        write_auto_labels(store)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return BuildSummary(path=Path(path), tokens=builder.tokens_done,
                            tokens_this_run=builder.tokens_done - start_tokens,
                            seconds=time.perf_counter() - t0, scan_seconds=scan_seconds,
                            db_bytes=Path(path).stat().st_size)
    finally:
        store.close()


def _n_features(transcoder) -> int:
    cfg = getattr(transcoder, "cfg", None)
    if cfg is not None and getattr(cfg, "n_features", None):
        return int(cfg.n_features)
    return int(transcoder.encoder_bias(0).shape[-1])


def _scan_all(builder: _Builder, documents: Iterable[str] | None, max_tokens: int | None,
              show_progress: bool, progress) -> None:
    """The scan loop: batches of contexts until the documents or the token budget run out."""
    cfg = builder.cfg
    if documents is None:
        from cltrace.data.corpus import iter_documents

        documents = iter_documents(split="heldout")
    per_ctx = cfg.context_len - 1
    contexts = itertools.islice(iter_contexts(builder.model, documents, cfg.context_len),
                                builder.contexts_done, None)
    remaining = None if max_tokens is None else max(0, max_tokens - builder.tokens_done)
    bar = progress(total=remaining, desc="features", unit="tok", unit_scale=True,
                   disable=None if show_progress else True)
    try:
        while remaining is None or remaining > 0:
            want = cfg.batch_contexts if remaining is None else min(cfg.batch_contexts, -(-remaining // per_ctx))
            batch = list(itertools.islice(contexts, want))
            if not batch:
                break
            builder.scan(batch)
            bar.update(len(batch) * per_ctx)
            if remaining is not None:
                remaining -= len(batch) * per_ctx
            if builder.pending_tokens >= cfg.flush_tokens:
                builder.flush()
    finally:
        bar.close()
        if builder.pending and builder.consistent:
            builder.flush()  # e.g. after Ctrl-C between batches: keep what was scanned
