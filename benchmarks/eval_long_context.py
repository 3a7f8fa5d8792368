"""Frames per second of chunked long-context evaluation vs token-by-token streaming.

    .venv/bin/python benchmarks/eval_long_context.py                   # tiny model on CPU
    .venv/bin/python benchmarks/eval_long_context.py --gpu             # + the 7B on CUDA
    .venv/bin/python benchmarks/eval_long_context.py --gpu --no-tiny --frames-7b 45000

Both modes compute the same thing (``moshi_ttt.eval.long_context.stream_losses``: temporal
transformer in moshi streaming mode with the TTT state carried, depformer teacher-forced,
per-position CE of text and 8 codebooks), on random codes: token by token (``chunk_frames=1``)
and in chunks. The largest CE difference between the two is printed as a check.

- ``tiny``: ``tiny_lm_kwargs()`` with the 7B's 3000-frame context by default, float32, CPU,
  one torch thread (on a small shared VM, more threads stall), TTT-MLP in 2 of 4 layers or none.
- ``7b`` (``--gpu``): ``moshi.models.loaders._lm_kwargs``, random weights, bf16, TTT-MLP in
  ``--layers-7b`` (default 3 layers); chunked over ``--frames-7b`` frames (default 45,000 =
  one hour), token by token over the first ``--token-frames-7b`` (default 300; the per-frame
  cost of streaming does not grow once the 3000-frame cache is full, so this is an upper bound
  on its speed for an hour); prints the peak GPU memory.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile

from moshi_ttt.eval.long_context import FileLosses, stream_losses
from moshi_ttt.integration import TTTConfig, apply_ttt, build_tiny_lm, reset_ttt_parameters


def random_codes(lm: LMModel, frames: int, seed: int = 0) -> torch.Tensor:
    """Codes ``[17, frames]``: random audio in both streams, random text."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (lm.num_codebooks, frames), generator=g)
    codes[0] = torch.randint(0, lm.text_card, (frames,), generator=g)
    return codes


@torch.no_grad()
def build_7b(layers: str, device: torch.device) -> LMModel:
    lm = LMModel(device="meta", dtype=torch.bfloat16, **loaders._lm_kwargs)
    if layers != "none":
        apply_ttt(lm, TTTConfig(layers=layers, kind="mlp", gate_init=0.1))
    lm = lm.to_empty(device=device)
    torch.manual_seed(0)
    for p in lm.parameters():
        p.normal_(0.0, 0.02)
    reset_ttt_parameters(lm)
    return lm.eval()


def timed(lm: LMModel, codes: torch.Tensor, chunk: int) -> tuple[float, FileLosses]:
    cuda = next(lm.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = stream_losses(lm, codes, chunk_frames=chunk)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, losses


def compare(lm: LMModel, codes: torch.Tensor, chunks: list[int], token_frames: int) -> list[dict]:
    """Token-by-token on the first ``token_frames`` frames, each chunk size on all of them."""
    for chunk in (1, *chunks):  # warm-up with the timed shapes (lazy inits, compiled kernels)
        stream_losses(lm, codes[:, : max(chunk, 4)], chunk_frames=chunk)
    token_s, token = timed(lm, codes[:, :token_frames], 1)
    token_fps = token_frames / token_s
    rows = []
    for chunk in chunks:
        seconds, chunked = timed(lm, codes, chunk)
        n = token_frames
        diff = max(  # where the shorter token-by-token run scores (its last frame is not)
            float((chunked.text[:n] - token.text).abs()[token.text_mask].max()),
            float((chunked.audio[:, :n] - token.audio).abs()[token.audio_mask].max()),
        )
        fps = codes.shape[-1] / seconds
        rows.append(
            {
                "chunk": chunk,
                "fps": fps,
                "token_fps": token_fps,
                "speedup": fps / token_fps,
                "diff": diff,
            }
        )
    return rows


def table(title: str, rows: list[tuple[str, str, int, int, dict]]) -> None:
    print(f"\n{title}\n")
    print(
        "| model | TTT | frames (token-by-token) | chunk | chunked frames/s | "
        "token-by-token frames/s | speed-up | max CE diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model, ttt, frames, token_frames, r in rows:
        print(
            f"| {model} | {ttt} | {frames:,} ({token_frames:,}) | {r['chunk']} | "
            f"{r['fps']:,.1f} | {r['token_fps']:,.1f} | x{r['speedup']:.1f} | "
            f"{r['diff']:.1e} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=1000, help="tiny: frames per file")
    p.add_argument(
        "--token-frames", type=int, default=0, help="tiny: token-by-token frames (default: all)"
    )
    p.add_argument("--chunks", default="50,250", help="chunk sizes, frames")
    p.add_argument("--context", type=int, default=3000, help="tiny: attention context")
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads")
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny model")
    p.add_argument("--gpu", action="store_true", help="also the 7B config on CUDA")
    p.add_argument("--frames-7b", type=int, default=45000)
    p.add_argument("--token-frames-7b", type=int, default=300)
    p.add_argument("--chunks-7b", default="250,1000")
    p.add_argument("--layers-7b", default="10,20,30", help="TTT layers of the 7B, or none")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}, {datetime.date.today()}"
    )
    if not args.no_tiny:
        chunks = [int(c) for c in args.chunks.split(",")]
        token_frames = args.token_frames or args.frames
        rows = []
        with no_compile():
            for ttt in ("mlp", "none"):
                lm = build_tiny_lm(0, context=args.context)
                if ttt != "none":
                    torch.manual_seed(0)
                    apply_ttt(lm, TTTConfig(layers="1,3", kind=ttt, gate_init=0.1))
                codes = random_codes(lm, args.frames)
                for r in compare(lm, codes, chunks, token_frames):
                    rows.append(("tiny", ttt, args.frames, token_frames, r))
        table(f"tiny model, CPU, float32, context {args.context}", rows)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: CUDA is not available")
        device = torch.device("cuda")
        lm = build_7b(args.layers_7b, device)
        codes = random_codes(lm, args.frames_7b)
        torch.cuda.reset_peak_memory_stats()
        chunks = [int(c) for c in args.chunks_7b.split(",")]
        rows = [
            ("7b", args.layers_7b, args.frames_7b, args.token_frames_7b, r)
            for r in compare(lm, codes, chunks, args.token_frames_7b)
        ]
        table(f"7B config, random weights, bf16, {torch.cuda.get_device_name()}", rows)
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
