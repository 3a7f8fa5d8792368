"""Uncertainty for the evaluation reports: intervals and paired tests (numpy only, seeded).

- ``mean_interval(values)``: the mean with a percentile bootstrap interval (and the normal one
  from the standard error), e.g. the accuracy over the groups of a benchmark;
- ``ratio_interval(sums, counts)``: a token-weighted mean (sum of CE / tokens, nats) with a
  bootstrap over the units (files), e.g. the loss beyond the context;
- ``paired_difference(a, b)``: the mean of ``a - b`` over paired units, its bootstrap interval
  and a two-sided bootstrap p-value; identical inputs give difference 0 and p = 1;
- ``ratio_difference``: the same for two token-weighted means over the same files;
- both take a **sum of token-weighted means** too (``[terms, files]`` sums and counts, e.g.
  moshi-finetune's text + audio loss): each term's ratio, summed, on the same resampled files;
- ``mcnemar_exact(b, c)``: McNemar's exact test (two-sided binomial on the discordant pairs).

Bootstraps resample units with replacement ``n_boot`` times with ``numpy.random.default_rng
(seed)``; intervals are percentile intervals at ``level`` (default 0.95); ``method`` names the
unit resampled ("bootstrap over files", "... over groups").

No interval or p-value from fewer than ``MIN_UNITS`` (5) units: a bootstrap over 1 unit gives
a zero-width interval and p = 0, over 2 units p is 0 or about 0.5. Below it ``lo``, ``hi``
(and ``p_value``, ``se``) are NaN and ``note`` says ``"n = 1: no interval (fewer than 5
files)"``; ``fmt_interval`` then prints ``"n = 1: no interval"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
SEED = 0
MIN_UNITS = 5  # fewer units (files, groups): no interval, no p-value


def too_few(n: int, unit: str, min_units: int = MIN_UNITS) -> dict[str, Any] | None:
    """``{"note": "n = N: no interval (fewer than 5 files)"}`` when ``n < min_units``, else
    None."""
    if n >= min_units:
        return None
    return {"note": f"n = {n}: no interval (fewer than {min_units} {unit})"}


def no_interval(ci: dict[str, Any]) -> str | None:
    """``"n = N: no interval"`` for a result below the minimum (one with a ``note``), else
    None."""
    if not ci.get("note"):
        return None
    return f"n = {ci.get('n', '?')}: no interval"


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(finite, [a, 1 - a], axis=0)
    return float(lo), float(hi)


def format_p(p: float | None, bootstrap: bool = True, n_boot: int = N_BOOT) -> str:
    """A p-value as text: ``"-"`` when there is none; a bootstrap p below its resolution
    (``2 / n_boot``: no resample on the other side of 0) as ``"< 0.001"``, never ``"0"``."""
    if p is None or not math.isfinite(p):
        return "-"
    if bootstrap and p < 2 / n_boot:
        return f"< {2 / n_boot:.2g}"
    return f"{p:.3g}"


def _p_value(samples: np.ndarray, observed: float) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller share of the
    bootstrap differences on either side of 0 (1 when all are 0)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0 or not math.isfinite(observed):
        return float("nan")
    return float(min(1.0, 2 * min(np.mean(finite <= 0), np.mean(finite >= 0))))


def mean_interval(
    values: Sequence[float] | np.ndarray,
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    unit: str = "values",
    min_units: int = MIN_UNITS,
) -> dict[str, Any]:
    """``{"mean", "lo", "hi", "se", "n", "level", "method"}`` of ``values`` (NaN dropped):
    percentile bootstrap over the values (``unit``: what they are, e.g. "groups");
    ``se`` = sample std / sqrt(n). Under ``min_units`` values: ``lo``, ``hi``, ``se`` NaN
    and a ``note``."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    method = f"bootstrap over {unit} ({n_boot}, seed {seed})"
    out: dict[str, Any] = {"n": n, "level": level, "method": method}
    mean = float(x.mean()) if n else math.nan
    few = too_few(n, unit, min_units)
    if few is not None:
        return out | few | {"mean": mean, "lo": math.nan, "hi": math.nan, "se": math.nan}
    boot = x[_indices(n, n_boot, seed)].mean(1)
    lo, hi = _percentiles(boot, level)
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return out | {"mean": float(x.mean()), "lo": lo, "hi": hi, "se": se}


def ratio_sum(num: Any, den: Any) -> Any:
    """``sum over terms of num / den`` over the first axis (``[terms, ...]`` -> ``[...]``): a
    term with no token (``den`` 0) counts 0, as in the training loss; NaN where no term has
    one. One term: ``num / den`` (NaN where ``den`` is 0). A float for a 0-d result."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    ratios = np.divide(num, den, out=np.zeros(num.shape), where=den > 0)
    out = np.where((den > 0).any(0), ratios.sum(0), np.nan)
    return float(out) if out.ndim == 0 else out


def _ratio(sums: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per resample (rows of ``idx``), ``ratio_sum`` of ``sums``, ``counts`` ``[terms, files]``
    over the resampled files."""
    return ratio_sum(sums[:, idx].sum(-1), counts[:, idx].sum(-1))


def _terms(sums: Any, counts: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)`` as ``[terms, files]`` float64 (1-d: one term); ``ValueError`` on
    other shapes."""
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if s.shape != c.shape or s.ndim not in (1, 2):
        raise ValueError(f"{what} must be [files] or [terms, files] of one shape, got "
                         f"{s.shape}, {c.shape}")  # fmt: skip
    return (s[None], c[None]) if s.ndim == 1 else (s, c)


def _total(sums: np.ndarray, counts: np.ndarray) -> float:
    """``ratio_sum`` of ``[terms, files]`` over all files."""
    return ratio_sum(sums.sum(-1), counts.sum(-1))


def ratio_interval(
    sums: Sequence[float] | np.ndarray,
    counts: Sequence[float] | np.ndarray,
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    min_units: int = MIN_UNITS,
) -> dict[str, Any]:
    """Token-weighted mean ``sum(sums) / sum(counts)`` over units (files) with a bootstrap
    interval over the files: ``{"mean", "lo", "hi", "n", "level", "method"}``; ``n`` = files
    with a token. ``[terms, files]`` inputs: the sum of the terms' means. Under ``min_units``
    such files: ``lo``, ``hi`` NaN and a ``note``."""
    s, c = _terms(sums, counts, "sums and counts")
    n = int((c > 0).any(0).sum())
    method = f"bootstrap over files ({n_boot}, seed {seed})"
    out: dict[str, Any] = {"n": n, "level": level, "method": method}
    mean = _total(s, c)
    few = too_few(n, "files", min_units)
    if few is not None:
        return out | few | {"mean": mean, "lo": math.nan, "hi": math.nan}
    lo, hi = _percentiles(_ratio(s, c, _indices(s.shape[1], n_boot, seed)), level)
    return out | {"mean": mean, "lo": lo, "hi": hi}


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    unit: str = "units",
    min_units: int = MIN_UNITS,
) -> dict[str, Any]:
    """Mean of ``a - b`` over paired units (NaN pairs dropped; ``unit``: what they are, e.g.
    "groups") with a bootstrap interval and p-value: ``{"difference", "lo", "hi", "p_value",
    "n", "level", "method"}``. Under ``min_units`` pairs: ``lo``, ``hi``, ``p_value`` NaN and
    a ``note``."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values must have one shape, got {x.shape} and {y.shape}")
    d = (x - y)[np.isfinite(x) & np.isfinite(y)]
    n = int(d.size)
    out: dict[str, Any] = {
        "n": n,
        "level": level,
        "method": f"paired bootstrap over {unit} ({n_boot}, seed {seed})",
    }
    few = too_few(n, unit, min_units)
    if few is not None:
        nan = {"lo": math.nan, "hi": math.nan, "p_value": math.nan}
        return out | few | nan | {"difference": float(d.mean()) if n else math.nan}
    boot = d[_indices(n, n_boot, seed)].mean(1)
    lo, hi = _percentiles(boot, level)
    mean = float(d.mean())
    return out | {"difference": mean, "lo": lo, "hi": hi, "p_value": _p_value(boot, mean)}


def ratio_difference(
    sums_a: np.ndarray,
    counts_a: np.ndarray,
    sums_b: np.ndarray,
    counts_b: np.ndarray,
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    min_units: int = MIN_UNITS,
) -> dict[str, Any]:
    """``sum(a)/count(a) - sum(b)/count(b)`` over the same files (arrays aligned by file) with
    a paired bootstrap over files: ``{"difference", "lo", "hi", "p_value", "n", ...}``
    (for losses in nats: > 0 means b is better); ``n`` = files with a token in a or b.
    ``[terms, files]`` inputs: sums of the terms' means. Under ``min_units`` such files:
    ``lo``, ``hi``, ``p_value`` NaN and a ``note``."""
    sa, ca = _terms(sums_a, counts_a, "per-file arrays")
    sb, cb = _terms(sums_b, counts_b, "per-file arrays")
    if sa.shape != sb.shape:
        raise ValueError(f"per-file arrays must be of one shape, got {sa.shape}, {sb.shape}")
    n = int(((ca > 0) | (cb > 0)).any(0).sum())
    out: dict[str, Any] = {
        "n": n,
        "level": level,
        "method": f"paired bootstrap over files ({n_boot}, seed {seed})",
    }
    nan = {"lo": math.nan, "hi": math.nan, "p_value": math.nan}
    if ca.sum() == 0 or cb.sum() == 0:
        return out | nan | {"difference": math.nan} | (too_few(n, "files", min_units) or {})
    diff = _total(sa, ca) - _total(sb, cb)
    few = too_few(n, "files", min_units)
    if few is not None:
        return out | few | nan | {"difference": diff}
    idx = _indices(sa.shape[1], n_boot, seed)
    boot = _ratio(sa, ca, idx) - _ratio(sb, cb, idx)
    lo, hi = _percentiles(boot, level)
    return out | {"difference": diff, "lo": lo, "hi": hi, "p_value": _p_value(boot, diff)}


def share_interval(
    gains: Sequence[float] | np.ndarray,
    available: Sequence[float] | np.ndarray,
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    min_units: int = MIN_UNITS,
) -> dict[str, Any]:
    """``sum(gains) / sum(available)`` over paired units (files) with a bootstrap interval over
    them: ``{"share", "lo", "hi", "gain", "available", "n", ...}`` (``gain``, ``available``:
    the means per unit). NaN share where nothing is available (``available`` summing to <= 0:
    there is no gain to take a share of). Under ``min_units`` units: ``lo``, ``hi`` NaN."""
    g, a = np.asarray(gains, dtype=np.float64), np.asarray(available, dtype=np.float64)
    if g.shape != a.shape or g.ndim != 1:
        raise ValueError(f"gains and available must be 1-d of one length, got {g.shape}, {a.shape}")
    n = int(g.size)
    out: dict[str, Any] = {"n": n, "level": level,
                           "method": f"bootstrap over files ({n_boot}, seed {seed})"}  # fmt: skip
    total = float(a.sum()) if n else math.nan
    share = float(g.sum() / total) if n and total > 0 else math.nan
    out |= {"share": share, "gain": float(g.mean()) if n else math.nan,
            "available": float(a.mean()) if n else math.nan}  # fmt: skip
    few = too_few(n, "files", min_units)
    if few is not None or not math.isfinite(share):
        return out | (few or {"note": "no gain available"}) | {"lo": math.nan, "hi": math.nan}
    idx = _indices(n, n_boot, seed)
    num, den = g[idx].sum(1), a[idx].sum(1)
    boot = np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)
    lo, hi = _percentiles(boot, level)
    return out | {"lo": lo, "hi": hi}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` pairs right only under A and ``c`` right only
    under B: ``min(1, 2 P[X <= min(b, c)])``, X ~ Binomial(b + c, 1/2); 1 when b + c = 0."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return float(min(1.0, 2 * tail))


def fmt_interval(ci: dict[str, Any], scale: float = 1.0, digits: int = 2, key: str = "mean") -> str:
    """``"58.21 [56.10, 60.30]"``: ``ci[key]`` and its interval times ``scale`` (signed for
    ``key="difference"``); ``"58.21 (n = 3: no interval)"`` below the minimum of units;
    ``-`` if NaN."""
    v = ci.get(key, math.nan)
    if v is None or not math.isfinite(v):
        return "-"
    f = f"{'+' if key == 'difference' else ''}.{digits}f"
    if (few := no_interval(ci)) is not None:
        return f"{scale * v:{f}} ({few})"
    lo, hi = ci.get("lo"), ci.get("hi")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{scale * v:{f}}"
    return f"{scale * v:{f}} [{scale * lo:{f}}, {scale * hi:{f}}]"


def flip_interval(ci: dict[str, Any] | None) -> dict[str, Any] | None:
    """A paired interval of ``a - b`` (``difference``, ``lo``, ``hi``, ...) as one of
    ``b - a`` (the p-value, ``n`` and notes unchanged)."""
    if not ci:
        return ci

    def neg(v: Any) -> Any:  # None: a NaN read back from report.json
        return -v if isinstance(v, (int, float)) else v

    out = dict(ci)
    if "difference" in ci:
        out["difference"] = neg(ci["difference"])
    if "lo" in ci and "hi" in ci:
        out["lo"], out["hi"] = neg(ci["hi"]), neg(ci["lo"])
    return out
