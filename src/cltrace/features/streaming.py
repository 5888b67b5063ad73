"""StreamingStats: running per-feature statistics, merged batch by batch on the device.

Each batch's activations are merged into running buffers on the transcoder's device
(`torch.topk` over [buffer; batch] for the top-k, a segmented sort for the reservoirs), so
memory is O(L·F·(k + bins·per_bin)) whatever the corpus size:

- the `top_k` highest activations: value and location (context id, position);
- examples across the activation range: the range (0, max] is cut into `n_bins` equal
  slices and each slice keeps a uniform random sample of `per_bin` examples (reservoir
  sampling by random priority keys, so it merges like a top-k). Slices follow the *running*
  max, so when the max grows, earlier samples are re-binned and the sample is approximate;
- activation density counters: fires, sum and max of the activation.

The buffers round-trip through the store's packed records (`records` / `from_store`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cltrace.features.config import FeatureStoreConfig

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

    from cltrace.features.store import FeatureStore


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
        return (self.top_loc != self._snap_top).any(1) | (self.res_loc != self._snap_res).flatten(2).any(2)

    def update(self, acts: "Tensor", loc: "Tensor", seed: int) -> None:
        """Merge one slice of activations.

        Args:
            acts: [N, L, F] feature activations (>= 0) of N tokens.
            loc: [N] int32 global locations of those tokens.
            seed: seeds the reservoir keys (per slice, so resumed builds repeat them).
        """
        import torch

        gen = torch.Generator(device=acts.device).manual_seed(seed)
        by_layer = acts.float().transpose(0, 1).contiguous()  # [L, N, F]
        for layer in range(self.L):
            a = by_layer[layer]  # [N, F]
            fired = a > 0
            peak = a.max(0).values  # [F]
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
        feats = (peak > self.top_val[layer, -1]).nonzero().squeeze(1)  # buffers are sorted
        if feats.numel() == 0:
            return
        old_val, old_loc = self.top_val[layer][:, feats], self.top_loc[layer][:, feats]
        val, idx = torch.cat([old_val, a[:, feats]], 0).topk(k, dim=0)  # [k, f]
        new_loc = torch.where(idx < k, old_loc.gather(0, idx.clamp(max=k - 1)), loc[(idx - k).clamp(min=0)])
        self.top_val[layer][:, feats] = val
        self.top_loc[layer][:, feats] = torch.where(val > 0, new_loc, torch.full_like(new_loc, -1))

    def _merge_reservoir(
        self, layer: int, a: "Tensor", fired: "Tensor", loc: "Tensor", gen: "torch.Generator"
    ) -> None:
        """Keep, per (feature, slice of its range), the `per_bin` entries with the largest
        random keys among the stored ones and this slice's activations of fired features."""
        import torch

        B, m = self.cfg.n_bins, self.cfg.per_bin
        tok_i, feat_i = fired.nonzero(as_tuple=True)
        if feat_i.numel() == 0:
            return
        fids = torch.unique(feat_i)  # features to redo
        old_key = self.res_key[layer, fids]  # [f, B, m]
        keep_old = old_key >= 0
        feats = torch.cat([fids[:, None, None].expand_as(keep_old)[keep_old], feat_i])
        vals = torch.cat([self.res_val[layer, fids][keep_old], a[tok_i, feat_i]])
        locs = torch.cat([self.res_loc[layer, fids][keep_old], loc[tok_i]])
        keys = torch.cat([old_key[keep_old], torch.rand(feat_i.numel(), generator=gen, device=a.device)])
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
        parts = [
            self.top_val[layer][:, idx].T,
            self.top_loc[layer][:, idx].T,
            self.res_key[layer, idx].flatten(1),
            self.res_val[layer, idx].flatten(1),
            self.res_loc[layer, idx].flatten(1),
        ]
        arrays = [p.contiguous().cpu().numpy() for p in parts]
        return np.concatenate(
            [x.astype("<f4" if x.dtype.kind == "f" else "<i4").view("<u4") for x in arrays], axis=1
        )

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
        self.top_loc[layer, :, feat] = i32[:, k : 2 * k]
        self.res_key[layer, feat] = f32[:, 2 * k : 2 * k + r].view(-1, B, m)
        self.res_val[layer, feat] = f32[:, 2 * k + r : 2 * k + 2 * r].view(-1, B, m)
        self.res_loc[layer, feat] = i32[:, 2 * k + 2 * r :].view(-1, B, m)

    def stats_blobs(self, layer: int) -> tuple[bytes, bytes, bytes]:
        return (
            self.n_fires[layer].cpu().numpy().astype("<i8").tobytes(),
            self.sum_act[layer].cpu().numpy().astype("<f8").tobytes(),
            self.max_act[layer].cpu().numpy().astype("<f4").tobytes(),
        )

    def load_stats(self, layer: int, n_fires: bytes, sum_act: bytes, max_act: bytes) -> None:
        import numpy as np
        import torch

        self.n_fires[layer] = torch.from_numpy(np.frombuffer(n_fires, "<i8").astype("int64")).to(self.device)
        self.sum_act[layer] = torch.from_numpy(np.frombuffer(sum_act, "<f8").astype("float64")).to(
            self.device
        )
        self.max_act[layer] = torch.from_numpy(np.frombuffer(max_act, "<f4").astype("float32")).to(
            self.device
        )

    @classmethod
    def from_store(
        cls, store: FeatureStore, cfg: FeatureStoreConfig, device: "torch.device"
    ) -> "StreamingStats":
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
