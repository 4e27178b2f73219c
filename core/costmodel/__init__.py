"""The idealized-runtime cost model, as pure mathematics (no gRPC, no store, no service):

    runtime(p, o) = overhead + alpha(p) + sum_{i=1}^{o-1} beta(p + i),   beta(c) = beta0 + beta1*c

- `options`: `FitOptions`, every default of a fit held once (`DEFAULT_BOOTSTRAP` and the rest).
- `fit`: samples -> `CostModel` (which samples count, beta, alpha knots, overhead).
- `predict`: alpha, beta, decode sums and runtimes of a model at any (p, o).
- `bootstrap`: replicate fits and percentile intervals, for parameters and predictions.
- `evaluate`: held-out and k-fold quality, HELM's proportional rule beside ours.
- `estimate`: workload estimates (sums, percentiles, out-of-domain counts), in one call or
  accumulated over a stream.
- `robust`: the robust statistics under all of them (grouped medians, MAD, Huber, isotonic).
- `validate`: the internal consistency of a cost model (`check_cost_model`), checked before
  a model is stored: every later prediction on it is a finite number of seconds.

The dataclasses a model is made of (`CostModel`, `FitQuality`) live in `idealrt.core.domain`
beside `Sample` and `StackSpec`, which they refer to, and are re-exported here. The metrics
service and the profiler's adaptive planner both build on this package.
"""

from __future__ import annotations

from idealrt.core.costmodel.bootstrap import bootstrap_models, intervals, predict_interval
from idealrt.core.costmodel.estimate import (
    WorkloadAccumulator,
    WorkloadEstimate,
    estimate_workload,
    validate_queries,
)
from idealrt.core.costmodel.evaluate import heldout_quality, kfold_quality, quality_for
from idealrt.core.costmodel.fit import (
    fit_cost_model,
    fit_prepared,
    fit_with_replicates,
    usable_samples,
)
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP, FitOptions
from idealrt.core.costmodel.predict import (
    alpha_at,
    beta_at,
    decode_sum,
    out_of_domain,
    predict_runtime,
)
from idealrt.core.costmodel.validate import check_cost_model
from idealrt.core.domain import CostModel, FitQuality

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "CostModel",
    "FitOptions",
    "FitQuality",
    "WorkloadAccumulator",
    "WorkloadEstimate",
    "alpha_at",
    "beta_at",
    "bootstrap_models",
    "check_cost_model",
    "decode_sum",
    "estimate_workload",
    "fit_cost_model",
    "fit_prepared",
    "fit_with_replicates",
    "heldout_quality",
    "intervals",
    "kfold_quality",
    "out_of_domain",
    "predict_interval",
    "predict_runtime",
    "quality_for",
    "usable_samples",
    "validate_queries",
]
