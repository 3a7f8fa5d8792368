"""The associative recall memory inside Moshi, while streaming (``LMGen``, the server, chunked
evaluation): each step's text distribution mixed with what the memory recalls for this
context (``ttt.recall``; measured in ``eval.recall``, docs/retrofit.md "Recall").

``apply_recall(lm, setting, lam)`` adds ``lm.recall`` (a ``RecallMemory``: no parameters, a
fixed random projection rebuilt from its seed on first use, state per batch row in
``RecallState``) and
three hooks on moshi's modules, so no moshi code and no parameter name changes:

- ``text_emb`` (pre): the text tokens this call reads, the tokens the previous steps produced:
  the targets of those steps, written into the memory now that they are known;
- ``transformer`` (pre): the summed input embeddings (what was just said and heard), part of
  the keys; (post): arms the text head for this step;
- the last layer's end-to-end memory, if any (pre): the base's final hidden state, which the
  keys use (the memory after it changes what the text head reads);
- ``text_linear`` (post): the text logits replaced by ``log((1 - g) p_model + g p_mem)``,
  ``g = lam * conf``; sampling from them samples the mixture. Only the call right after the
  transformer's (``forward_text``): a recomputation of the head (the end-to-end memory's live
  update) is left alone.

Outside streaming (training, the end-to-end scan) the hooks do nothing: the model is the base
(the end-to-end scan's evaluation mixes the memory in afterwards, ``mix_file``). Each step
writes the previous step's token and reads its own key, touching only the key's active units
(``ttt.recall.delta_step_sparse_``), with the state carried between calls, so any chunking
equals the evaluation's ``eval.recall.memory_reads`` (tested). Rows reset with moshi's
``reset_streaming(mask)``; ``RecallState.tensors()`` is saved
and restored with a conversation by the server like the TTT states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import State, StreamingModule
from torch import nn

from ..ttt.recall import (
    GATE_SIZE,
    delta_chunked,
    delta_step_sparse_,
    key_units,
    learned_gate,
    mix_ce,
    mix_log_probs,
    read_distribution,
    sparse_keys,
    sparse_read,
)
from .e2e import E2ELayer


@dataclass(frozen=True)
class RecallSetting:
    """The associative memory (``eval.recall.MemorySetting`` with ``kind="assoc"``, the same
    fields) and its mixing weight ``lam`` and projection ``seed``."""

    keys: int = 8192
    active: int = 64
    beta: float = 1.0
    sharpen: float = 2.0
    scale: float = 1.0
    context: int = 4
    lam: float = 0.7
    seed: int = 0
    gate: tuple[float, ...] = ()  # a learned gate (``ttt.recall.learned_gate``); (): lam * conf

    def __post_init__(self) -> None:
        checks = {"recall_keys": self.keys >= 1, "recall_active": 1 <= self.active <= self.keys,
                  "recall_beta": 0 < self.beta <= 1, "recall_sharpen": self.sharpen > 0,
                  "recall_scale": self.scale > 0, "recall_context": self.context >= 0,
                  "recall_lam": 0 <= self.lam <= 1}  # fmt: skip
        checks["recall_gate"] = len(self.gate) in (0, GATE_SIZE)
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]}: {getattr(self, bad[0][7:])} is out of range (keys >= 1, "
                             "1 <= active <= keys, 0 < beta <= 1, sharpen and scale > 0, "
                             "context >= 0, 0 <= lam <= 1)")  # fmt: skip


def recall_projection(setting: RecallSetting, dim: int) -> torch.Tensor:
    """The fixed random projection ``[Dk, (1 + context) * dim]`` float64 (``eval.recall``'s,
    from the same seed: the evaluation and the live memory hash alike)."""
    g = torch.Generator().manual_seed(1_000_003 * setting.seed + setting.keys)
    return torch.randn(setting.keys, (1 + setting.context) * dim, generator=g,
                       dtype=torch.float64)  # fmt: skip


def key_inputs(h: torch.Tensor, x: torch.Tensor, past: torch.Tensor,
               context: int) -> torch.Tensor:  # fmt: skip
    """What the keys hash ``[B, T, (1 + context) dim]``: the unit hidden states ``h [B, T,
    dim]``, then the unit inputs of the last ``context`` steps, latest first, from ``x [B, T,
    dim]`` and the ``past [B, >= context - 1, dim]`` inputs before them (zeros before a
    conversation starts), float64."""
    parts = [nn.functional.normalize(h.double(), dim=-1)]
    xs = nn.functional.normalize(torch.cat([past.double(), x.double()], 1), dim=-1)
    T, P = x.shape[1], past.shape[1]
    for j in range(context):
        parts.append(xs[:, P - j : P - j + T])
    return torch.cat(parts, -1)


@dataclass
class RecallState(State):
    """Per batch row: the memory ``w [B, V, Dk]``, the last ``context`` inputs ``inputs [B, n,
    dim]`` (latest last), the active units of the last step's key, still waiting for its token,
    ``pending_key [B, active]`` (float ids) and whether there is one ``pending [B]`` (1.0 /
    0.0)."""

    w: torch.Tensor
    inputs: torch.Tensor
    pending_key: torch.Tensor  # its active units (float ids)
    pending: torch.Tensor

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        for t in self.tensors():
            t.masked_fill_(reset_mask.view(-1, *([1] * (t.dim() - 1))), 0.0)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w, self.inputs, self.pending_key, self.pending)


class RecallMemory(StreamingModule[RecallState]):
    """The memory's module (``lm.recall``): settings, projection, streaming state; the hooks of
    ``apply_recall`` call ``tokens``, ``inputs`` and ``mix``."""

    def __init__(self, setting: RecallSetting, dim: int, vocab: int) -> None:
        super().__init__()
        self.setting, self.dim, self.vocab = setting, dim, vocab
        self._proj: torch.Tensor | None = None  # built on first use (``projection``)
        self._head: nn.Linear | None = None  # the text head (not a child: no new state keys)
        self._tokens: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._trunk: torch.Tensor | None = None
        self._armed = False

    def _init_streaming_state(self, batch_size: int) -> RecallState:
        s = self.setting
        dev = self._head.weight.device if self._head is not None else torch.device("cpu")
        zeros = lambda *shape: torch.zeros(*shape, device=dev)  # noqa: E731
        return RecallState(batch_size, dev, zeros(batch_size, self.vocab, s.keys),
                           zeros(batch_size, max(1, s.context), self.dim),
                           zeros(batch_size, s.active), zeros(batch_size))  # fmt: skip

    def tokens(self, ids: torch.Tensor) -> None:
        """The text tokens this call reads ``[B, T]``."""
        if self._streaming_state is not None:
            self._tokens = ids

    def inputs(self, x: torch.Tensor) -> None:
        """The transformer's input ``[B, T, dim]``."""
        if self._streaming_state is not None:
            self._x = x

    def trunk(self, h: torch.Tensor) -> None:
        """The base's final hidden state ``[B, T, dim]`` when a memory after the last layer
        changes what the text head reads (the end-to-end memory): the keys are the base's."""
        if self._streaming_state is not None:
            self._trunk = h

    def arm(self) -> None:
        """The transformer has run this step: the next text-head call is the step's."""
        self._armed = self._streaming_state is not None

    def key_inputs(self, h: torch.Tensor, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """``key_inputs`` with this memory's context."""
        return key_inputs(h, x, past, self.setting.context)

    def keys(self, h: torch.Tensor, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """Unit sparse keys ``[B, T, Dk]`` (``ttt.recall.sparse_keys`` of ``key_inputs``)."""
        return sparse_keys(self.key_inputs(h, x, past), self.projection(h.device),
                           self.setting.active)  # fmt: skip

    def projection(self, device: torch.device) -> torch.Tensor:
        """The fixed random projection (``recall_projection``, float64) on ``device``, built on
        first use: a model that is only trained, planned or loaded never holds it (Moshi 7B:
        8192 x 20480, 1.34 GB)."""
        if self._proj is None or self._proj.device != device:
            self._proj = recall_projection(self.setting, self.dim).to(device)
        return self._proj

    def mix(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Write the previous steps' tokens, read this call's keys, return the mixed
        log-probabilities ``[B, T, V]`` in the logits' dtype (unchanged outside streaming and
        for a head call that is not the step's)."""
        st = self._streaming_state
        if st is None or not self._armed:
            return logits
        self._armed = False
        if self._tokens is None or self._x is None:
            raise RuntimeError("the recall memory saw a step without its inputs: call the model "
                               "through forward_text / LMGen")  # fmt: skip
        s = self.setting
        ids, x = self._tokens.to(h.device), self._x
        if self._trunk is not None:
            h = self._trunk
        self._tokens = self._x = self._trunk = None
        valid = (ids >= 0) & (ids < self.vocab)
        past = st.inputs[:, st.inputs.shape[1] - max(0, s.context - 1) :]
        units = key_units(self.key_inputs(h, x, past), self.projection(h.device), s.active)
        # each step: the previous step's token written (for the first step, the previous
        # call's last, whose token is the first one this call reads), then this key read
        reads = []
        for t in range(units.shape[1]):
            if t == 0:
                prev, ok = st.pending_key.long(), st.pending.bool() & valid[:, 0]
            else:
                prev, ok = units[:, t - 1], valid[:, t]
            delta_step_sparse_(st.w, prev, ids[:, t], ok, s.beta)
            reads.append(sparse_read(st.w, units[:, t]))
        reads = torch.stack(reads, 1)
        st.pending_key.copy_(units[:, -1])
        st.pending.fill_(1.0)
        hist = torch.cat([st.inputs, x.float()], 1)
        st.inputs.copy_(hist[:, hist.shape[1] - st.inputs.shape[1] :])
        p_mem, conf = read_distribution(reads, s.sharpen, s.scale)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return mix_log_probs(logp, p_mem, self.weight(h, p_mem, conf)).to(logits.dtype)

    def entropy(self, h: torch.Tensor) -> torch.Tensor:
        """The entropy (nats) of the base's text distribution at the base's final hidden
        states ``h [..., dim]`` (what a learned gate reads)."""
        head = self._head
        assert head is not None, "apply_recall sets the text head"
        logp = torch.log_softmax(nn.functional.linear(h.to(head.weight), head.weight,
                                                      head.bias).float(), dim=-1)  # fmt: skip
        return -(logp.exp() * logp).sum(-1)

    def weight(self, h: torch.Tensor, p_mem: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        """The memory's mixing weight: ``lam * conf``, or the learned gate."""
        s = self.setting
        if not s.gate:
            return s.lam * conf
        return learned_gate(s.gate, conf, p_mem.amax(-1), self.entropy(h)).to(conf.dtype)


def mix_file(memory: RecallMemory, h: torch.Tensor, x: torch.Tensor, targets: torch.Tensor,
             write: torch.Tensor, text_ce: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The memory over one whole file at once, for a scan that is not streamed (the end-to-end
    memory's evaluation): the text CE ``[S]`` per step mixed with the memory's reads, from the
    base's final hidden states ``h [S, dim]``, inputs ``x [S, dim]``, each step's text target
    ``targets [S]`` and ``write [S]`` (scored). Equals streaming the file (the same keys and
    writes: ``eval.recall`` checks it against ``memory_reads``)."""
    s = memory.setting
    past = x.new_zeros(1, max(0, s.context - 1), x.shape[-1])
    keys = memory.keys(h[None], x[None], past)[0].double()
    reads, _ = delta_chunked(keys, targets, write, s.beta, memory.vocab)
    p, conf = read_distribution(reads, s.sharpen, s.scale)
    p_y = p.gather(1, targets.clamp(0, memory.vocab - 1).long()[:, None])[:, 0]
    return mix_ce(text_ce, p_y, memory.weight(h, p, conf)).to(text_ce.dtype)


def apply_recall(lm: LMModel, setting: RecallSetting) -> RecallMemory:
    """Add the recall memory to ``lm`` (module docstring); returns ``lm.recall``."""
    if isinstance(getattr(lm, "recall", None), RecallMemory):
        raise ValueError("this model already has a recall memory")
    if any(isinstance(m, StreamingModule) and m.is_streaming for m in lm.modules()):
        raise ValueError("apply_recall cannot change a model while it is streaming")
    layers = list(lm.transformer.layers)
    e2e = [i for i, layer in enumerate(layers) if isinstance(layer, E2ELayer)]
    if e2e and e2e != [len(layers) - 1]:
        raise ValueError(f"the recall memory keys on the base's last hidden state; with the "
                         f"end-to-end memory in layers {e2e} that state is not the base's: put "
                         "the end-to-end memory after the last layer only (top:1)")  # fmt: skip
    memory = RecallMemory(setting, lm.dim, int(lm.text_card))
    lm.recall = memory
    object.__setattr__(memory, "_head", lm.text_linear)  # a reference, not a child module
    if e2e:  # the base's final hidden state: the last layer's output, before the memory
        norm = lm.out_norm if lm.out_norm is not None else nn.Identity()
        layers[-1].e2e.register_forward_pre_hook(lambda _m, args: memory.trunk(norm(args[0])))
    lm.text_emb.register_forward_pre_hook(lambda _m, args: memory.tokens(args[0]))
    lm.transformer.register_forward_pre_hook(lambda _m, args: memory.inputs(args[0]))
    lm.transformer.register_forward_hook(lambda _m, args, out: memory.arm())
    lm.text_linear.register_forward_hook(lambda _m, args, out: memory.mix(args[0], out))
    lm._cached_children = None  # moshi caches the streaming children on first use
    return memory
