"""Recall on real data: does a memory bring back what was said beyond the attention window?

Three measures, each on the per-position text CE that every evaluation curve keeps
(``PositionLosses.file_text``):

- **repeated bytes** (``repeat_masks``): beyond the window, the positions whose preceding ``n``
  tokens occurred earlier in the file *only* with their continuation outside the window (what a
  memory could recall and the window cannot), against all the others;
- **needles** (``needle_shares``): a phrase ``key=value`` planted early in a held-out file and
  its key asked again ``m`` windows later (cases built by ``demo.needle``); the value's tokens
  at the query are scored. A row's gain at distance ``m`` is its CE when another key and value
  were planted early (the format is primed, this value is not; the base's CE there where that
  is lower: a memory misled by the other phrase is not credited) minus its CE when this one was;
  its share is that gain over the base's CE in the first case (perfect recall: 0 nats) and,
  beside it, over the base's CE minus the base's with the phrase inside its window (what the
  window could give, where the base copies what it sees), with bootstrap intervals over files;
- **memory rows** (``memory_reads``, ``mix_curve``): a recall memory over the frozen base's
  final hidden states (``ttt.recall``: the continuous cache, growing; the associative memory,
  fixed), mixed into any row's prediction in probability space. The memory's keys are the
  *base's* hidden states (the end-to-end memory sits after the last layer, so the base's states
  are the trunk's whatever that memory learns), computed once per file by ``base_features``.
  Its settings and mixing weight are chosen on the validation files (``choose_memory``) by the
  rule of the end-to-end memory (``eval.e2e.choose_setting``: the best beyond the window among
  the settings that do no harm inside it).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from moshi.models.lm import LMModel
from moshi.modules.rope import apply_rope
from moshi.modules.transformer import apply_weights_per_step
from tqdm import tqdm

from ..integration.recall import RecallSetting, recall_projection
from ..integration.recall import key_inputs as recall_key_inputs
from ..recipes import HARM_TOLERANCE
from ..ttt.recall import (
    cache_target_probs,
    delta_chunked,
    fit_gate,
    learned_gate,
    mix_ce,
    read_distribution,
    sparse_keys,
)
from .e2e import choose_setting
from .long_context import PositionLosses
from .long_context.scoring import FileLosses, record_inputs, stream_losses
from .stats import ratio_difference, ratio_interval, share_interval

KINDS = ("cache", "assoc")
# the memory rows of the demos: row -> (the row it mixes into, the memory's kind)
MEMORY_ROWS = {"cache": ("base", "cache"), "assoc": ("base", "assoc"),
               "e2e_assoc": ("e2e", "assoc"), "e2e_meta_assoc": ("e2e_meta", "assoc")}  # fmt: skip


@dataclass(frozen=True)
class MemorySetting:
    """A recall memory: ``kind`` ``"cache"`` (``theta``: the sharpness of its softmax over
    cosine similarities) or ``"assoc"`` (``keys`` units Dk with ``active`` of them on per key,
    delta-rule strength ``beta``; its read sharpened to the power ``sharpen`` and its
    confidence scaled by ``scale``: ``ttt.recall.read_distribution``)."""

    kind: str
    theta: float = 10.0
    keys: int = 4096
    active: int = 16
    beta: float = 1.0
    sharpen: float = 1.0
    scale: float = 1.0
    context: int = 0  # keys also from the inputs of the last ``context`` steps (0: hidden only)
    gate: tuple[float, ...] = ()  # a learned gate (``ttt.recall.learned_gate``); (): lam * conf

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"memory kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def label(self) -> str:
        if self.kind == "cache":
            return f"cache theta {self.theta:g}"
        keys = f"hidden + last {self.context} inputs" if self.context else "hidden"
        gate = ", learned gate" if self.gate else ""
        return (f"assoc Dk {self.keys} ({keys}), {self.active} active, beta {self.beta:g}, "
                f"sharpen {self.sharpen:g}, scale {self.scale:g}{gate}")  # fmt: skip

    def scan_key(self) -> tuple:
        """What the memory's scan depends on (settings that share it share one scan)."""
        return (self.kind, self.theta) if self.kind == "cache" else (
            self.kind, self.keys, self.active, self.beta, self.context)  # fmt: skip

    def state_bytes(self, vocab: int, frames: int, dim: int) -> int:
        """Bytes of state per conversation after ``frames`` frames (float32 W for ``assoc``;
        bf16 hidden states and int32 tokens for the cache)."""
        if self.kind == "assoc":
            return 4 * vocab * self.keys
        return frames * (2 * dim + 4)


@dataclass(frozen=True)
class MemoryGrid:
    """The recall memories' settings tried on validation, and the mixing weights."""

    cache_thetas: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0)
    # (Dk, active units): Dk 8192 is 1.05 GB of float32 state for Moshi 7B's 32,000 text
    # tokens, within its window's KV cache (1.46 GiB)
    assoc_keys: tuple[tuple[int, int], ...] = ((8192, 32), (8192, 64))
    assoc_betas: tuple[float, ...] = (1.0, 0.5)
    assoc_contexts: tuple[int, ...] = (0, 4, 8)  # keys also from the last n inputs
    assoc_sharpen: tuple[float, ...] = (1.0, 2.0)
    assoc_scale: tuple[float, ...] = (1.0, 2.0)
    lams: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    learned_gate: bool = True  # also a gate fitted on training files, for the best setting

    def settings(self, kind: str) -> list[MemorySetting]:
        if kind == "cache":
            return [MemorySetting("cache", theta=t) for t in self.cache_thetas]
        return [MemorySetting("assoc", keys=k, active=a, beta=b, sharpen=sh, scale=sc, context=n)
                for k, a in self.assoc_keys for b in self.assoc_betas
                for n in self.assoc_contexts for sh in self.assoc_sharpen
                for sc in self.assoc_scale]  # fmt: skip


QUICK_GRID = MemoryGrid(cache_thetas=(10.0,), assoc_keys=((256, 8),), assoc_betas=(1.0,),
                        assoc_sharpen=(1.0,), assoc_scale=(1.0,), assoc_contexts=(2,),
                        lams=(0.1, 0.5))  # fmt: skip


@dataclass
class Features:
    """The frozen base's view of one file: final hidden states ``h [T, dim]`` at the frames
    whose text token they predict, the transformer's input there ``x [T, dim]`` (the sum of the
    streams' embeddings of the previous step: what was just said and heard), that token
    ``targets [T]``, ``scored [T]`` and the entropy of the base's text distribution there
    ``entropy [T]`` (nats; what a learned gate reads)."""

    h: torch.Tensor
    x: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def base_features(lm: LMModel, files: Sequence[tuple[str, torch.Tensor]], chunk_frames: int,
                  block_frames: int, progress: bool = False,
                  ) -> tuple[dict[str, Features], PositionLosses]:  # fmt: skip
    """Every file's ``Features`` and the base's curve over them (the same pass: the base row
    needs no second one)."""
    curve = PositionLosses(lm.dep_q, block_frames)
    feats: dict[str, Features] = {}
    d = int(lm.delays[0])
    for name, codes in tqdm(files, desc="base features", unit="file", leave=False,
                            disable=not progress):  # fmt: skip
        pieces: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []
        hook = lm.transformer.register_forward_pre_hook(record_inputs(inputs))
        try:
            f = stream_losses(lm, codes, chunk_frames=chunk_frames, hidden=pieces)
        finally:
            hook.remove()
        curve.add(f, name)
        T = codes.shape[-1]
        h, x = torch.zeros(T, lm.dim), torch.zeros(T, lm.dim)
        h[: T - d] = torch.cat(pieces)[d:]  # [T, dim] per step; step s predicts frame s - d
        x[: T - d] = torch.cat(inputs)[d:]
        logp = torch.log_softmax(lm.text_linear(h.to(lm.text_linear.weight)).float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1).cpu()
        feats[name] = Features(h, x, codes[0].long().clamp_min(0), f.text_mask.clone(), entropy)
    return feats, curve


def projection(setting: MemorySetting, dim: int, seed: int) -> torch.Tensor:
    """The associative memory's fixed random projection ``[Dk, (1 + context) * dim]``
    (float64, from ``seed``): of the hidden state, then of each of the last ``context``
    inputs; the live memory's (``integration.recall``)."""
    return recall_projection(
        RecallSetting(keys=setting.keys, active=setting.active, context=setting.context,
                      seed=seed), dim)  # fmt: skip


def key_inputs(setting: MemorySetting, f: Features) -> torch.Tensor:
    """What the keys of one file hash, ``[T, (1 + context) * dim]``
    (``integration.recall.key_inputs``: zeros before the file starts)."""
    past = f.x.new_zeros(1, max(0, setting.context - 1), f.x.shape[-1])
    return recall_key_inputs(f.h[None], f.x[None], past, setting.context)[0]


def memory_scan(setting: MemorySetting, feats: dict[str, Features], vocab: int,
                seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per file, the memory's raw output at each position, read before its own token is
    written (``ttt.recall``): the cache's ``p_cache(target) [T]``, the associative memory's
    reads ``[T, V]``."""
    out = {}
    proj = None
    for name, f in feats.items():
        if setting.kind == "cache":
            out[name] = cache_target_probs(f.h, f.targets, f.scored, [setting.theta])[0]
            continue
        if proj is None:
            proj = projection(setting, f.h.shape[-1], seed)
        keys = sparse_keys(key_inputs(setting, f), proj, setting.active)
        out[name] = delta_chunked(keys, f.targets, f.scored, setting.beta, vocab)[0]
    return out


def memory_reads(setting: MemorySetting, feats: dict[str, Features], vocab: int, seed: int = 0,
                 scan: dict[str, torch.Tensor] | None = None,
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Per file ``(p_mem(target) [T], conf [T])`` (``scan``: ``memory_scan``'s output for this
    setting, if already computed). The cache's confidence is 1 once anything is written (its
    mixing weight is then the constant ``lam``, as in Grave et al.)."""
    scan = memory_scan(setting, feats, vocab, seed) if scan is None else scan
    out = {}
    for name, f in feats.items():
        if setting.kind == "cache":
            written = torch.cumsum(f.scored.long(), 0) - f.scored.long() > 0
            out[name] = (scan[name].numpy(), written.double().numpy())
            continue
        p, conf = read_distribution(scan[name], setting.sharpen, setting.scale)
        p_y = p.gather(1, f.targets.clamp(0, vocab - 1)[:, None])[:, 0]
        if setting.gate:  # the weight itself: mixed with lam = 1
            conf = learned_gate(setting.gate, conf, p.amax(-1), f.entropy)
        out[name] = (p_y.numpy(), conf.numpy())
    return out


def fit_memory_gate(setting: MemorySetting, feats: dict[str, Features], curve: PositionLosses,
                    vocab: int, seed: int = 0) -> MemorySetting:  # fmt: skip
    """``setting`` with a learned gate (``ttt.recall.fit_gate``) fitted on the frozen base's
    scored positions of ``feats`` / ``curve`` (training files, never the held-out ones)."""
    if setting.kind != "assoc":
        raise ValueError("a learned gate is for the associative memory")
    plain = dataclasses.replace(setting, gate=())
    scan = memory_scan(plain, feats, vocab, seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("conf", "peak", "ent", "pb", "pm")}
    for name, (ce, mask) in zip(curve.file_names, curve.file_text):
        f = feats[name]
        p, conf = read_distribution(scan[name], setting.sharpen, setting.scale)
        keep = torch.from_numpy(mask.astype(bool))
        p_y = p.gather(1, f.targets.clamp(0, vocab - 1)[:, None])[:, 0]
        for k, v in (("conf", conf), ("peak", p.amax(-1)), ("ent", f.entropy),
                     ("pb", torch.exp(-torch.from_numpy(ce).double())), ("pm", p_y)):  # fmt: skip
            parts[k].append(v[keep])
    c = {k: torch.cat(v) for k, v in parts.items()}
    return dataclasses.replace(plain, gate=fit_gate(c["conf"], c["peak"], c["ent"], c["pb"],
                                                    c["pm"]))  # fmt: skip


def text_curve(block_frames: int, dep_q: int,
               files: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> PositionLosses:  # fmt: skip
    """A text-only curve from per-file ``(name, ce [T], scored [T])``."""
    curve = PositionLosses(dep_q, block_frames)
    for name, ce, mask in files:
        T = len(ce)
        curve.add(FileLosses(torch.from_numpy(np.where(mask, ce, 0.0)).float(),
                             torch.from_numpy(mask.astype(bool)),
                             torch.zeros(dep_q, T), torch.zeros(dep_q, T, dtype=torch.bool)),
                  name)  # fmt: skip
    return curve


def mix_curve(curve: PositionLosses, reads: dict[str, tuple[np.ndarray, np.ndarray]],
              lam: float) -> PositionLosses:  # fmt: skip
    """``curve``'s text CE with the memory mixed in: ``(1 - lam conf) p + lam conf p_mem``
    (the memory predicts text tokens: the audio CE stays ``curve``'s)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"the memory's mixing weight must be in [0, 1], got {lam}")
    files = []
    for name, (ce, mask) in zip(curve.file_names, curve.file_text):
        p_y, conf = reads[name]
        n = len(ce)
        mixed = mix_ce(torch.from_numpy(ce), torch.from_numpy(p_y[:n]),
                       lam * torch.from_numpy(conf[:n])).numpy()  # fmt: skip
        files.append((mixed, mask))
    return curve.with_text(files)


def restrict(curve: PositionLosses, keep: dict[str, np.ndarray]) -> PositionLosses:
    """``curve`` scored only where ``keep[name]`` (text only)."""
    files = [(name, ce, mask & keep[name][: len(mask)])
             for name, (ce, mask) in zip(curve.file_names, curve.file_text)]  # fmt: skip
    return text_curve(curve.block_frames, curve.audio_sum.shape[0], files)


def choose_memory(curve: PositionLosses, feats: dict[str, Features],
                  settings: Sequence[MemorySetting], lams: Sequence[float], context: int,
                  vocab: int, seed: int = 0, harm_tolerance: float | None = HARM_TOLERANCE,
                  scans: dict[tuple, dict[str, torch.Tensor]] | None = None,
                  metric: str = "text_ce") -> tuple[dict, list[dict]]:  # fmt: skip
    """The memory setting and mixing weight for the row ``curve`` (scored on *validation*
    files whose ``feats`` are given): every ``(setting, lam)``'s ``metric`` (text CE, or
    moshi's loss on data with audio) within and beyond ``context`` and the rule of
    ``eval.e2e.choose_setting``. Returns ``(chosen, scores)``. ``scans``: a dict kept between
    calls on the same ``feats`` (each scan is computed once)."""
    if not settings or not lams:
        raise ValueError("choose_memory: the grid is empty")
    base_within = curve.totals(0, context)[metric]
    base_beyond = curve.totals(context)[metric]
    scores = []
    scans = {} if scans is None else scans
    for setting in settings:
        key = setting.scan_key()
        if key not in scans:
            scans[key] = memory_scan(setting, feats, vocab, seed)
        reads = memory_reads(setting, feats, vocab, seed, scans[key])
        for lam in (1.0,) if setting.gate else lams:
            mixed = mix_curve(curve, reads, lam)
            within, beyond = mixed.totals(0, context)[metric], mixed.totals(context)[metric]
            scores.append({"setting": setting, "lam": float(lam), metric: beyond,
                           "within": within, "harm_within": within - base_within,
                           "gain_beyond": beyond - base_beyond})  # fmt: skip
    best = choose_setting(scores, metric, harm_tolerance)
    return best, scores


@dataclass
class MemoryChoice:
    """A memory row's validation choice: its setting, mixing weight, every score, and the
    memory's own cost on the held-out files (ms per frame: the scan and the read, beside the
    row it mixes into)."""

    setting: MemorySetting
    lam: float
    scores: list[dict]
    on: str
    ms_per_frame: float = math.nan

    def label(self) -> str:
        return self.setting.label() + ("" if self.setting.gate else f", lam {self.lam:g}")

    def to_dict(self) -> dict:
        return {"chosen": {**dataclasses.asdict(self.setting), "lam": self.lam},
                "label": self.label(), "on": self.on,
                "memory_ms_per_frame": self.ms_per_frame,
                "validation": [{**x, "setting": x["setting"].label()}
                               for x in self.scores]}  # fmt: skip


def add_memory_rows(rows: dict[str, tuple[str, str]], curves: dict[str, PositionLosses],
                    val_curves: dict[str, PositionLosses], feats: dict[str, Features],
                    val_feats: dict[str, Features], grid: MemoryGrid, context: int, vocab: int,
                    seed: int = 0, fit: tuple[dict[str, Features], PositionLosses] | None = None,
                    metric: str = "text_ce") -> dict[str, MemoryChoice]:  # fmt: skip
    """Add the memory rows ``{row: (the row it mixes into, kind)}`` to ``curves`` (held-out
    files, ``feats``), each chosen on the validation files (``val_curves`` of the row it mixes
    into, ``val_feats``; ``choose_memory``); rows whose underlying row is missing are skipped.
    ``fit``: the base's features and curve on training files, where a learned gate is fitted
    for the associative memory's best setting and competes with it on validation. ``metric``:
    what the choices minimise (``choose_memory``)."""
    chosen = {}
    scans: dict[tuple, dict[str, torch.Tensor]] = {}  # the validation scans, shared by rows
    gates: dict[tuple, MemorySetting] = {}  # learned gates, by the scan they read
    frames = sum(len(f.targets) for f in feats.values())
    for row, (under, kind) in rows.items():
        if under not in curves or under not in val_curves:
            continue
        settings = grid.settings(kind)
        best, scores = choose_memory(val_curves[under], val_feats, settings, grid.lams, context,
                                     vocab, seed, scans=scans, metric=metric)  # fmt: skip
        if fit is not None and kind == "assoc" and grid.learned_gate:
            key = (best["setting"].scan_key(), best["setting"].sharpen, best["setting"].scale)
            if key not in gates:
                gates[key] = fit_memory_gate(best["setting"], fit[0], fit[1], vocab, seed)
            _, more = choose_memory(val_curves[under], val_feats, [gates[key]], [1.0], context,
                                    vocab, seed, scans=scans, metric=metric)  # fmt: skip
            scores = scores + more
            best = choose_setting(scores, metric, HARM_TOLERANCE)
        choice = MemoryChoice(best["setting"], best["lam"], scores, under)
        start = time.perf_counter()
        reads = memory_reads(choice.setting, feats, vocab, seed)
        choice.ms_per_frame = 1000 * (time.perf_counter() - start) / max(1, frames)
        curves[row] = mix_curve(curves[under], reads, choice.lam)
        chosen[row] = choice
    return chosen


def repeat_masks(tokens: np.ndarray, context: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(recallable, other)`` bool ``[T]`` over the positions ``t >= context``: recallable
    where the ``n`` tokens before t occurred earlier in the file and every such occurrence's
    next token lies more than ``context`` frames back (``j < t - context``: outside the window
    that predicts t); other: every other position beyond the window."""
    if n < 1:
        raise ValueError(f"repeat n must be >= 1 token, got {n}")
    T = len(tokens)
    last: dict[bytes, int] = {}
    recall = np.zeros(T, dtype=bool)
    tok = np.asarray(tokens, dtype=np.int64)
    for t in range(n, T):
        key = tok[t - n : t].tobytes()
        j = last.get(key)
        if t >= context and j is not None and j < t - context:
            recall[t] = True
        last[key] = t
    beyond = np.arange(T) >= context
    return recall, beyond & ~recall


def repeat_split(curves: dict[str, PositionLosses], tokens: dict[str, np.ndarray], context: int,
                 n: int, reference: str = "base") -> dict[str, dict]:  # fmt: skip
    """Per row, the text CE beyond the window on the recallable positions and on the others
    (``repeat_masks``), with intervals over files and the paired difference to ``reference``:
    ``{row: {"recallable": {...}, "other": {...}, "tokens": {...}}}``."""
    masks = {name: repeat_masks(t, context, n) for name, t in tokens.items()}
    out: dict[str, dict] = {}
    parts = {"recallable": 0, "other": 1}
    subsets = {part: {row: restrict(c, {k: m[i] for k, m in masks.items()})
                      for row, c in curves.items()} for part, i in parts.items()}  # fmt: skip
    for row in curves:
        entry: dict[str, dict] = {}
        for part in parts:
            c = subsets[part][row]
            t = c.file_totals()["text_ce"]
            entry[part] = ratio_interval(t["sum"], t["count"])
            entry[part]["tokens"] = float(t["count"].sum())
            if row != reference and reference in curves:
                r = subsets[part][reference].file_totals()["text_ce"]
                entry[part]["vs_reference"] = ratio_difference(t["sum"], t["count"], r["sum"],
                                                               r["count"])  # fmt: skip
        out[row] = entry
    return out


def _file_sums(curve: PositionLosses) -> dict[str, tuple[float, float]]:
    t = curve.file_totals()["text_ce"]
    return {n: (float(s), float(c)) for n, s, c in zip(curve.file_names, t["sum"], t["count"])}


def _mean_over(sums: dict[str, tuple[float, float]], names: list[str]) -> float:
    return sum(sums[n][0] for n in names) / max(1e-9, sum(sums[n][1] for n in names))


def needle_shares(row: dict[str, PositionLosses], base: dict[str, PositionLosses],
                  distances: Sequence[int]) -> dict[str, dict]:  # fmt: skip
    """Per distance ``m``, the row's share of the available gain from the scored needle curves
    (``"true_{m}x"``, ``"floor_{m}x"`` of the row, and of the base with ``"inside"``), paired on
    file names: ``{"{m}x": {"share", "lo", "hi", ..., "window": {...}, "ce_*"}}``.

    The row's gain is its CE on the value when another key and value came early (or the
    base's there, if lower: a memory that wrongly recalls the other value is not credited for
    it) minus its CE when this one did. ``share``: against perfect recall (the base's CE on
    the value in the first case: all of it recalled is 0 nats); ``window``: against the base
    with the phrase inside its window (the issue's ceiling; meaningless where the base does
    not copy what it sees, which ``ce_inside`` against ``ce_base_floor`` shows)."""
    out = {}
    inside = _file_sums(base["inside"])
    for m in distances:
        true, floor = _file_sums(row[f"true_{m}x"]), _file_sums(row[f"floor_{m}x"])
        bfloor = _file_sums(base[f"floor_{m}x"])
        names = [n for n in true if n in floor and n in bfloor and n in inside and true[n][1] > 0]
        gains = [(min(floor[n][0], bfloor[n][0]) - true[n][0]) / true[n][1] for n in names]
        entry = share_interval(gains, [bfloor[n][0] / true[n][1] for n in names])
        entry["window"] = share_interval(
            gains, [(bfloor[n][0] - inside[n][0]) / true[n][1] for n in names]
        )
        entry |= {k: _mean_over(d, names) for k, d in (("ce_true", true), ("ce_floor", floor),
                  ("ce_base_floor", bfloor), ("ce_inside", inside))}  # fmt: skip
        out[f"{m}x"] = entry
    return out


# -- retrieval of evicted keys and values (InfLLM / Unlimiformer style; growing state) ------
@torch.no_grad()
def retrieval_losses(lm: LMModel, codes: torch.Tensor, top_k: int,
                     chunk_frames: int = 64) -> FileLosses:  # fmt: skip
    """Per-position losses of one file when the top layer's attention also reads the
    ``top_k`` keys and values (per head and position) that left its window, exact and training
    free: the frozen base runs as it is up to its top layer (streamed, window C); the top layer
    is recomputed over the file with, at position t, its C-frame window plus the ``top_k``
    evicted positions ``i <= t - C`` of highest ``q_t . k_i``, each read as if it sat just
    outside the window (relative distance C under RoPE, as InfLLM places retrieved memory; the
    model never saw larger distances). ``top_k = 0`` is the base (tested). Text CE only: the
    depformer is not rerun (text corpora)."""
    if top_k < 0:
        raise ValueError(f"retrieval top_k must be >= 0, got {top_k}")
    top = lm.transformer.layers[-1]
    attn = top.self_attn
    if top.skip_self_attn or attn.cross_attention or attn.kv_repeat != 1 or not attn.context:
        raise ValueError("retrieval needs a top layer with windowed causal self-attention "
                         "(no cross-attention, no grouped keys)")  # fmt: skip
    grabbed: list[torch.Tensor] = []
    hook = top.register_forward_pre_hook(record_inputs(grabbed))
    try:
        base = stream_losses(lm, codes, chunk_frames=chunk_frames)
    finally:
        hook.remove()
    x = torch.cat(grabbed)[None].to(next(lm.parameters()).device)  # [1, S, dim] per step
    h = top._ff_block(_retrieval_attention(top, x, top_k))
    if lm.out_norm is not None:
        h = lm.out_norm(h)
    logits = lm.text_linear(h)[0].float()  # [S, V]: step s predicts frame s - d
    d, T = int(lm.delays[0]), codes.shape[-1]
    target = codes[0].long().to(logits.device)
    ce = torch.zeros(T)
    n = T - d
    step_ce = torch.nn.functional.cross_entropy(logits[d:], target[:n].clamp_min(0),
                                                reduction="none")  # fmt: skip
    ce[:n] = step_ce.cpu()
    mask = base.text_mask.clone()
    return FileLosses(torch.where(mask, ce, 0.0), mask, base.audio, base.audio_mask,
                      base.text_padding)  # fmt: skip


def _retrieval_attention(layer: torch.nn.Module, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """``layer``'s self-attention block on ``x [1, S, dim]`` with retrieval (above)."""
    attn = layer.self_attn
    H, C = attn.num_heads, int(attn.context)
    xn = layer.norm1(x)
    projected = apply_weights_per_step(attn.in_projs, attn.weights_per_step_schedule, xn, 0)
    q, k, v = rearrange(projected, "b t (p h d) -> p b h t d", p=3, h=H)
    S, D = q.shape[2], q.shape[3]
    pos = torch.arange(S, device=x.device)
    if attn.rope is not None:
        zero = torch.zeros(1, dtype=torch.long, device=x.device)
        qw, kw = apply_rope(q, k, zero, attn.rope.max_period, attn.rope.interleave)
        # a key read at relative distance C: (R_t q) . (R_{t-C} k) = (R_C q) . k
        qc = q.transpose(1, 2).reshape(S, H, 1, D)
        qc, _ = apply_rope(qc, qc, torch.full((S,), C, device=x.device),
                           attn.rope.max_period, attn.rope.interleave)  # fmt: skip
        qc = qc.reshape(1, S, H, D).transpose(1, 2)
    else:
        qw, kw, qc = q, k, q
    scale = D**-0.5
    delta = pos[:, None] - pos[None, :]
    window = (qw @ kw.transpose(-1, -2)) * scale
    window = window.masked_fill(~((delta >= 0) & (delta < C)), -math.inf)
    parts, values = [window], [v]
    if top_k > 0:
        evicted = (qc @ k.transpose(-1, -2)) * scale
        evicted = evicted.masked_fill(~(delta >= C), -math.inf)
        kk = min(top_k, S)
        best = evicted.topk(kk, dim=-1)
        keep = torch.full_like(evicted, -math.inf).scatter(-1, best.indices, best.values)
        parts.append(keep)
        values.append(v)
    scores = torch.cat(parts, dim=-1)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = sum(w @ val for w, val in zip(weights.split(S, dim=-1), values))
    out = rearrange(out, "b h t d -> b t (h d)")
    update = apply_weights_per_step(attn.out_projs, attn.weights_per_step_schedule, out, 0)
    return x + layer.layer_scale_1(update)


def evaluate_retrieval(lm: LMModel, files: Sequence[tuple[str, torch.Tensor]], top_k: int,
                       block_frames: int, chunk_frames: int = 64) -> PositionLosses:  # fmt: skip
    """``retrieval_losses`` of every file, as a curve."""
    curve = PositionLosses(lm.dep_q, block_frames)
    for name, codes in files:
        curve.add(retrieval_losses(lm, codes, top_k, chunk_frames), name)
    return curve
