"""A synthetic long-context task for the demo: a fresh random Markov chain in every sequence.

Every sequence has its own hidden *sparse transition table*: each of the V symbols has k
successors, drawn uniformly at random (a k-subset of the V symbols) independently for each symbol
and each sequence. The sequence starts at a uniform symbol and then, at every frame, moves from
symbol a to one of a's k successors (uniformly) with probability ``1 - noise``, or jumps to a
uniformly random symbol with probability ``noise`` (which keeps the chain visiting every symbol).

Why only a long memory solves it: the table is new in every sequence, so nothing about it can be
learned in the weights; the only way to predict what follows ``a`` is to have seen what followed
``a`` earlier *in this sequence*. An attention window of C frames holds about C / V earlier
visits of ``a``, often none; a memory of the whole sequence holds about t / V of them at frame
t. The Bayes-optimal predictor (``oracle_nll``) therefore gets better along the sequence, while
the best predictor restricted to the last C frames (``oracle_nll(..., window=C)``) stays flat
once t > C. The gap between the two is what a memory can win.

Format: a shards directory (``moshi_ttt.data.pipeline.ShardSource``): ``shards.json`` and one
``NNNNNN.safetensors`` per sequence holding ``codes`` ``[17, T]`` int32. Row 0 (text) holds the
symbols as text tokens ``token_offset + symbol`` (the default offset 4 avoids Moshi's EPAD 0 and
PAD 3, which the loss weighs differently); rows 1-8 (Moshi's audio) are -1: no input and no
loss, so the training loss is the text loss of the next symbol. With ``user_echo`` (default)
rows 9-16 (the user's codebooks, never scored) repeat the symbol ids (so V <= the audio card):
Moshi feeds codebooks 1-7 one frame late (the acoustic delay), so the model's input at frame t
holds the symbol x[t-1] (text) *and* x[t-2] (user codebooks 1-7), i.e. the transition
x[t-2] -> x[t-1]. A single layer can then write transitions into its memory (key x[t-2], value
x[t-1]) and read with x[t-1]; without the echo a previous-token attention head must be learned
first, which the tiny models did not do within the demo's budget (see docs/demo.md).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..data.pipeline import SHARDS_INDEX
from ..format import FRAME_RATE, NUM_CODEBOOKS, NUM_STREAMS, ZERO_TOKEN

STREAMS = ("text", "audio")
MAX_SUBSETS = 20_000  # C(V, k) above this makes the exact oracle too slow


@dataclass(frozen=True)
class MarkovTask:
    """The task's parameters. Frames are Moshi's 80 ms frames (one symbol per frame).

    Attributes:
        num_symbols: alphabet size V.
        num_successors: k, successors per symbol (1 = a random function plus noise).
        noise: probability of a uniform jump instead of following the table, in [0, 1].
        seq_len: frames per sequence T.
        token_offset: text token of symbol 0; symbols use tokens ``offset .. offset + V - 1``.
        user_echo: also write the symbol ids into the user's 8 audio rows (module docstring).
        stream: where the scored symbols live: ``"text"`` (row 0, text tokens
            ``token_offset + symbol``; scored by the text CE) or ``"audio"`` (row 1, Moshi's
            own audio codebook 0, tokens = symbol ids, text row -1; scored by the audio CE of
            codebook 0, as the LibriLight long-context evaluation scores audio).
    """

    num_symbols: int = 16
    num_successors: int = 1
    noise: float = 0.2
    seq_len: int = 256
    token_offset: int = 4
    user_echo: bool = True
    stream: str = "text"

    def __post_init__(self) -> None:
        if self.num_symbols < 2:
            raise ValueError(f"num_symbols must be >= 2, got {self.num_symbols}")
        if not 1 <= self.num_successors <= self.num_symbols:
            raise ValueError(
                f"num_successors must be in 1..{self.num_symbols}, got {self.num_successors}"
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.token_offset < 0:
            raise ValueError(f"token_offset must be >= 0, got {self.token_offset}")
        if self.stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {self.stream!r}")

    @property
    def text_card(self) -> int:
        """The smallest text vocabulary holding every symbol token."""
        return self.token_offset + self.num_symbols

    def rng(self, seed: int, index: int) -> np.random.Generator:
        """The generator of sequence ``index`` of data set ``seed`` (independent of the rest)."""
        return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))

    def sample_table(self, rng: np.random.Generator) -> np.ndarray:
        """Successor table ``[V, k]`` int64: a uniform k-subset of the symbols per symbol."""
        V, k = self.num_symbols, self.num_successors
        return np.stack([np.sort(rng.choice(V, size=k, replace=False)) for _ in range(V)])

    def sample(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Symbols ``[T]`` int64 (0 .. V-1) and the table ``[V, k]`` of sequence ``index``."""
        rng = self.rng(seed, index)
        table = self.sample_table(rng)
        T, V, k = self.seq_len, self.num_symbols, self.num_successors
        jump = rng.random(T) < self.noise
        uniform = rng.integers(0, V, size=T)
        pick = rng.integers(0, k, size=T)
        symbols = np.empty(T, dtype=np.int64)
        symbols[0] = uniform[0]
        for t in range(1, T):
            symbols[t] = uniform[t] if jump[t] else table[symbols[t - 1], pick[t]]
        return symbols, table

    @property
    def metric(self) -> str:
        """The ``PositionLosses.totals`` key that scores the symbols: text CE or codebook 0."""
        return "text_ce" if self.stream == "text" else "cb0"

    def codes(self, symbols: np.ndarray) -> torch.Tensor:
        """Codes ``[17, T]`` int32: the symbols in row 0 (text tokens, ``stream="text"``) or
        row 1 (audio codebook 0, ``stream="audio"``), rows 9-16 the symbol ids with
        ``user_echo``, every other row -1 (no token, no loss)."""
        out = torch.full((NUM_STREAMS, len(symbols)), ZERO_TOKEN, dtype=torch.int32)
        if self.stream == "text":
            out[0] = torch.as_tensor(symbols + self.token_offset, dtype=torch.int32)
        else:
            out[1] = torch.as_tensor(symbols, dtype=torch.int32)
        if self.user_echo:
            out[1 + NUM_CODEBOOKS :] = torch.as_tensor(symbols, dtype=torch.int32)
        return out

    def symbols_of(self, codes: torch.Tensor) -> np.ndarray:
        """Inverse of ``codes``: symbols ``[T]`` from codes ``[17, T]`` (or the row ``[T]``)."""
        if self.stream == "audio":
            return (codes[1] if codes.dim() == 2 else codes).long().numpy()
        text = codes[0] if codes.dim() == 2 else codes
        return text.long().numpy() - self.token_offset

    # -- the Bayes-optimal predictor --------------------------------------------------------
    def transition_probs(self) -> np.ndarray:
        """``P(next = j | successor set S)`` for every k-subset S: ``[C(V, k), V]`` float64."""
        V, k = self.num_symbols, self.num_successors
        if math.comb(V, k) > MAX_SUBSETS:
            raise ValueError(f"C({V}, {k}) successor sets: too many for the exact oracle")
        subsets = np.array(list(itertools.combinations(range(V), k)), dtype=np.int64)
        probs = np.full((len(subsets), V), self.noise / V)
        np.put_along_axis(probs, subsets, self.noise / V + (1.0 - self.noise) / k, axis=1)
        return probs

    def oracle_nll(self, symbols: np.ndarray, window: int | None = None) -> np.ndarray:
        """Bayes-optimal negative log-likelihood (nats) of each symbol given the ones before it,
        knowing the task's prior (``[T]`` float64; frame 0 is ``log V``).

        ``window``: the predictor of frame t sees only the last ``window`` symbols
        ``x[t-window .. t-1]`` (the transitions among them), like attention with a context of
        ``window`` frames; None = all of them (a perfect memory).
        """
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        probs = self.transition_probs()
        logp = np.log(np.maximum(probs, 1e-300))  # noise 0: impossible moves, finite logs
        T, V = len(symbols), self.num_symbols
        nll = np.empty(T)
        nll[0] = math.log(V)
        counts = np.zeros((V, V))  # counts[a, b]: transitions a -> b currently visible
        for t in range(1, T):
            if window is None or window >= 2:
                if t >= 2:  # transition x[t-2] -> x[t-1] comes into view
                    counts[symbols[t - 2], symbols[t - 1]] += 1
                if window is not None and t - window >= 1:  # x[t-w-1] -> x[t-w] leaves it
                    counts[symbols[t - window - 1], symbols[t - window]] -= 1
            a = symbols[t - 1]
            w = logp @ counts[a]
            post = np.exp(w - w.max())
            post /= post.sum()
            nll[t] = -math.log(float(post @ probs[:, symbols[t]]))
        return nll

    def mean_oracle_nll(
        self, seed: int, num_sequences: int, window: int | None = None
    ) -> np.ndarray:
        """``oracle_nll`` ``[T]`` averaged over sequences ``0 .. num_sequences-1`` of ``seed``
        (the sequences ``write_shards(..., num_sequences, seed)`` writes)."""
        return np.mean(
            [self.oracle_nll(self.sample(seed, i)[0], window) for i in range(num_sequences)],
            axis=0,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def write_shards(out_dir: str | Path, task: MarkovTask, num_sequences: int, seed: int = 0) -> Path:
    """Write ``num_sequences`` sequences as a shards directory; returns ``out_dir``.

    Sequence i is ``task.sample(seed, i)``: the same seed gives the same files, bit for bit.
    ``shards.json`` records the task and the seed.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(num_sequences):
        symbols, _ = task.sample(seed, i)
        codes = task.codes(symbols)
        shard = f"{i:06d}.safetensors"
        name = f"markov-{seed}-{i}"
        tmp = out / f".{shard}.tmp"  # one metadata key: safetensors does not order keys
        save_file({"codes": codes.contiguous()}, str(tmp), metadata={"path": name})
        os.replace(tmp, out / shard)
        files.append({"shard": shard, "path": name, "frames": int(codes.shape[1])})
    summary = {
        "format": "moshi-ttt shards",
        "version": 1,
        "index": f"synthetic markov task, seed {seed}",
        "frame_rate": FRAME_RATE,
        "rows": "text = symbol tokens; audio rows -1"
        if task.stream == "text"
        else "audio codebook 0 = symbols; text and other audio rows -1",
        "task": task.to_dict(),
        "seed": int(seed),
        "files": files,
        "skipped": [],
        "stats": {"files_ok": num_sequences, "files_bad": 0},
    }
    tmp = out / f".{SHARDS_INDEX}.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SHARDS_INDEX)
    return out
