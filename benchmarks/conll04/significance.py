"""Paired bootstrap over test sentences: how much of a gap between two methods is test-set noise.

Both methods are scored on the same 288 test sentences, so their F1 gap is resampled together: each
resample draws the sentences with replacement and recomputes both micro F1 scores from the per-sentence
counts (Koehn 2004; Berg-Kirkpatrick et al. 2012). With several seeds the statistic is the mean gap over
the seeds both methods have, every seed scored on the same resampled sentences. The interval covers the
test-set sampling only; the spread over seeds is the report's ± column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks.conll04.data import Sentence
from benchmarks.conll04.metrics import COUNT_KEYS, sentence_counts
from benchmarks.conll04.tanl import parse_output

KINDS = ("entity", "relation")


def count_matrix(record: dict, gold: Sequence[Sentence], types: dict) -> np.ndarray:
    """Per-sentence counts (rows: sentences, columns: `COUNT_KEYS`) of a run's stored predictions.

    Raises ValueError when the run has no predictions for `gold` or when re-scoring them does not give
    the F1 the run recorded (the predictions and the data would not belong together).
    """
    texts = record.get("predictions")
    if texts is None or len(texts) != len(gold):
        raise ValueError(f"run {record.get('method')}-{record.get('train_fraction')}-{record.get('seed')} has "
                         f"{'no' if texts is None else len(texts)} predictions for {len(gold)} sentences")
    rows = sentence_counts(gold, [parse_output(t, s.tokens, types) for s, t in zip(gold, texts)])
    counts = np.array([[row[key] for key in COUNT_KEYS] for row in rows], dtype=np.float64)
    rescored = micro_f1(counts.sum(axis=0))
    for kind, value in zip(KINDS, rescored):
        if abs(value - record[f"{kind}_f1"]) > 1e-6:
            raise ValueError(f"re-scoring the stored predictions of {record['method']} gives {kind} F1 {value:.4f}, "
                             f"but the run recorded {record[f'{kind}_f1']:.4f}: the run and the data disagree")
    return counts


def micro_f1(totals: np.ndarray) -> np.ndarray:
    """Entity and relation micro F1 in percent from summed counts (last axis: `COUNT_KEYS`).

    Returns an array of shape `totals.shape[:-1] + (2,)`; F1 is 0 where nothing is correct.
    """
    out = []
    for k in range(len(KINDS)):
        gold, predicted, correct = (totals[..., 3 * k + i] for i in range(3))
        denominator = predicted + gold
        out.append(np.divide(200.0 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0))
    return np.stack(out, axis=-1)


def paired_bootstrap(ours: Sequence[np.ndarray], theirs: Sequence[np.ndarray], resamples: int = 10_000,
                     seed: int = 0, confidence: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Mean F1 gap (ours − theirs) over paired seeds and its bootstrap percentile interval.

    `ours[i]` and `theirs[i]` are count matrices (see `count_matrix`) of the same seed on the same
    sentences. Returns ``{"entity": (gap, low, high), "relation": (...)}`` in F1 points.
    """
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"need the same number (> 0) of runs on each side, got {len(ours)} and {len(theirs)}")
    n = ours[0].shape[0]
    if any(m.shape != ours[0].shape for m in (*ours, *theirs)):
        raise ValueError("every run must be scored on the same sentences")
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    observed = np.mean([micro_f1(a.sum(0)) - micro_f1(b.sum(0)) for a, b in zip(ours, theirs)], axis=0)
    resampled = np.mean([micro_f1(weights @ a) - micro_f1(weights @ b) for a, b in zip(ours, theirs)], axis=0)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail], axis=0)
    return {kind: (float(observed[k]), float(low[k]), float(high[k])) for k, kind in enumerate(KINDS)}
