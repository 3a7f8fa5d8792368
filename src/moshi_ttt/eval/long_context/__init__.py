"""Long-context evaluation: teacher-forced loss against position over whole files.

What is scored and how (teacher-forced, unweighted text and codebook CE per frame, streamed in
chunks with carried state, equal to token-by-token streaming) is defined once, in ``scoring``.

Variants of one model in the same run (``Variant``): ``ttt`` (full memory), ``reset_every_N``
(TTT state restarted every N frames, attention untouched) and ``no_ttt`` (gates forced to 0:
the base model). The headline is the loss difference, full memory minus control (negative:
the memory helps; docs/evaluation.md "Sign convention"), at positions beyond the attention
context (3,000 frames for Moshi), on one metric: ``"auto"`` (the default, ``choose_metric``)
takes the audio CE when audio tokens are scored beyond the context, else the text CE
(e.g. text-only shards whose audio rows are -1); callers may name one of ``METRICS``.

Modules: ``scoring`` (one file, in chunks), ``statistics`` (sums over files, metrics,
intervals), ``evaluate`` (every variant on every file -> ``LongContextResult``), ``report``
(markdown, plots).
"""

from .evaluate import evaluate_long_context, evaluate_variants
from .report import (
    write_long_context_report,
    write_long_context_section,
    write_result_section,
    write_run_info,
)
from .scoring import (
    CONTROLS,
    ChunkObserver,
    FileLosses,
    Variant,
    attention_context,
    attention_window,
    check_codes,
    is_gate_zero_base,
    long_context_variants,
    measure_speedup,
    segments,
    splice_history,
    stream_losses,
)
from .statistics import (
    AUTO,
    COLUMN_LABELS,
    METRIC_LABELS,
    METRICS,
    MOSHI_LOSS,
    NUM_AUDIO,
    LongContextResult,
    PositionLosses,
    auto_equal_length,
    binned_intervals,
    check_metric,
    choose_metric,
    file_intervals,
    flip_interval,
    harm_line,
    memory_gains,
    metric_note,
    per_file_data,
    ppl,
    resolve_metric,
    sign_note,
    summary_lines,
)

__all__ = [
    "AUTO",
    "COLUMN_LABELS",
    "CONTROLS",
    "METRICS",
    "MOSHI_LOSS",
    "METRIC_LABELS",
    "NUM_AUDIO",
    "ChunkObserver",
    "FileLosses",
    "LongContextResult",
    "PositionLosses",
    "Variant",
    "attention_context",
    "attention_window",
    "auto_equal_length",
    "binned_intervals",
    "check_codes",
    "check_metric",
    "choose_metric",
    "evaluate_long_context",
    "evaluate_variants",
    "file_intervals",
    "flip_interval",
    "harm_line",
    "is_gate_zero_base",
    "long_context_variants",
    "measure_speedup",
    "memory_gains",
    "metric_note",
    "per_file_data",
    "ppl",
    "resolve_metric",
    "segments",
    "sign_note",
    "splice_history",
    "stream_losses",
    "summary_lines",
    "write_long_context_report",
    "write_long_context_section",
    "write_result_section",
    "write_run_info",
]
