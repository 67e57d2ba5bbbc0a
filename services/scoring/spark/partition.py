"""What Spark's Python workers run on each Arrow batch of a partition: the scoring kernel's own
functions (kernel.transform, kernel.scores, kernel.qualify), not a rewrite of them. Imports only
numpy, pyarrow and the kernel, so a worker starts fast and needs nothing of the service."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from services.scoring.domain import kernel


def _matrix(batch: pa.RecordBatch, names: Sequence[str]) -> np.ndarray:
    X = np.empty((batch.num_rows, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        column = batch.column(name)
        if column.null_count:
            raise ValueError(f"feature {name} has empty (null) values: the export is damaged")
        X[:, j] = column.to_numpy(zero_copy_only=False)
    return X


def score_batches(spec: kernel.PolicySpec, stats: kernel.Statistics, extra: Sequence[str],
                  batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """(member_id, score, *extra) of each batch. RANK_PERCENTILE ranks against the population's
    quantile grid (``ranks="grid"``): a partition is not the population."""
    names = [f.name for f in spec.features]
    for batch in batches:
        if batch.num_rows == 0:
            continue
        transformed = kernel.transform(_matrix(batch, names), spec, stats, ranks="grid")
        score = kernel.scores(transformed, spec)
        yield pa.RecordBatch.from_arrays([batch.column("member_id"), pa.array(score, type=pa.float64()),
                                          *(batch.column(name).cast(pa.float64()) for name in extra)],
                                         names=["member_id", "score", *extra])


def qualify_batches(thresholds: Sequence[float], by_points: bool, extra: Sequence[str],
                    batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Adds each member's qualifying tier from its score (-1 under QUALIFYING_POINTS: the points
    are rewards', and scoring places those members when it imports the run)."""
    thr = np.array(thresholds, dtype=np.float64)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        scores = batch.column("score").to_numpy(zero_copy_only=False)
        tier = np.full(scores.size, -1, dtype=np.int8) if by_points else kernel.qualify(scores, thr)
        yield pa.RecordBatch.from_arrays([batch.column("member_id"), batch.column("score"), pa.array(tier),
                                          *(batch.column(name) for name in extra)],
                                         names=["member_id", "score", "qualifying", *extra])
