"""The metrics service's use cases over the store: fit, estimate, denoise, cost, roofline,
compare, HELM import/export. Plain domain code; the servicer only converts."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from idealrt.core.clock import utcnow
from idealrt.core.costmodel.bootstrap import predict_interval
from idealrt.core.costmodel.estimate import (
    WorkloadAccumulator,
    WorkloadEstimate,
    estimate_workload,
)
from idealrt.core.costmodel.fit import FitOptions, fit_with_replicates
from idealrt.core.domain import CostModel, Profile, ProfileState, Sample
from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.core.logging import get_logger
from idealrt.core.model_spec import ModelSpec

__all__ = ["EstimateResult", "MetricsEngine", "MetricsStore"]

FloatArray = npt.NDArray[np.float64]
_log = get_logger(__name__)


class MetricsStore(Protocol):
    def get_profile(self, id: str) -> Profile: ...
    def all_samples(self, profile_id: str) -> list[Sample]: ...
    def create_cost_model(self, cm: CostModel) -> tuple[CostModel, bool]: ...
    def get_cost_model(self, id: str) -> CostModel: ...
    def list_cost_models(
        self, page_size: int = 0, page_token: str = "", profile_id: str = ""
    ) -> tuple[list[CostModel], str]: ...


@dataclasses.dataclass(frozen=True)
class EstimateResult:
    workload: WorkloadEstimate
    runtime_s: FloatArray | None  # per query, when asked
    low_s: FloatArray | None
    high_s: FloatArray | None
    out_of_domain: npt.NDArray[np.bool_] | None
    sum_interval: tuple[float, float] | None


def _fit_options(cm: CostModel) -> FitOptions:
    """The options `cm` was fitted with (stored with it), so its replicates after a restart
    are the ones its intervals came from. A model stored before options were recorded gets
    the defaults with its beta mode, as before; an unreadable record the same, logged."""
    fallback = FitOptions(beta_linear=cm.beta1_s != 0)
    if not cm.fit_options:
        return fallback
    try:
        return FitOptions.from_record(cm.fit_options)
    except ValueError as e:
        _log.warning("fit_options_unreadable", cost_model_id=cm.id, error=str(e))
        return fallback


def _ood(
    cm: CostModel, p: npt.NDArray[np.int64], o: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    (p0, p1), (o0, o1) = cm.valid_prompt_tokens, cm.valid_output_tokens
    if p1 <= 0:
        return np.zeros(p.shape, dtype=np.bool_)
    return np.asarray((p < p0) | (p > p1) | (o < o0) | (o > o1), dtype=np.bool_)


class MetricsEngine:
    """Fits are stored; bootstrap replicates (for intervals on estimates) are cached in
    memory and re-derived from the profile's samples (same seed, same result) on a miss."""

    def __init__(self, store: MetricsStore, replicate_cache: int = 32) -> None:
        self.store = store
        self._replicates: OrderedDict[str, list[CostModel]] = OrderedDict()
        self._cache_size = replicate_cache
        self._lock = threading.Lock()

    # ---- fitting ----

    def _fit_samples(
        self, profile_id: str, *, allow_invalid: bool = False
    ) -> tuple[Profile, list[Sample]]:
        if not profile_id:
            raise InvalidArgument(
                "PROFILE_ID_REQUIRED", "profile_id is required", field="profile_id"
            )
        prof = self.store.get_profile(profile_id)
        if prof.state == ProfileState.INVALID and not allow_invalid:
            raise FailedPrecondition(
                "PROFILE_INVALID",
                f"profile {profile_id} ended INVALID (measured under contention: {prof.error}); "
                "an idealized cost model is never fitted to it",
                field="profile_id",
            )
        if prof.state != ProfileState.SUCCEEDED and not (
            allow_invalid and prof.state == ProfileState.INVALID
        ):
            raise FailedPrecondition(
                "PROFILE_NOT_SUCCEEDED",
                f"profile {profile_id} is {prof.state.value}; fit a SUCCEEDED profile",
                field="profile_id",
            )
        return prof, self.store.all_samples(profile_id)

    def fit(
        self, profile_id: str, options: FitOptions, *, request_id: str = "", name: str = ""
    ) -> CostModel:
        options.validate()
        prof, samples = self._fit_samples(profile_id)
        cm, reps = fit_with_replicates(samples, options=options, profile_id=profile_id)
        cm.fit_options = options.to_record()
        cm.request_id = request_id
        cm.name = name or f"{prof.model.name}-{prof.stack.backend.value}-{prof.stack.device}"
        cm.model_name = prof.model.name
        cm.stack = prof.stack
        cm.create_time = utcnow()
        stored, _ = self.store.create_cost_model(cm)
        self._remember(stored.id, reps)
        return stored

    def _remember(self, cm_id: str, reps: list[CostModel]) -> None:
        with self._lock:
            self._replicates[cm_id] = reps
            self._replicates.move_to_end(cm_id)
            while len(self._replicates) > self._cache_size:
                self._replicates.popitem(last=False)

    def replicates(self, cm: CostModel) -> list[CostModel]:
        with self._lock:
            if cm.id in self._replicates:
                return self._replicates[cm.id]
        if cm.kind != "idealized" or not cm.profile_id:
            return []
        try:
            options = _fit_options(cm)
            _, samples = self._fit_samples(cm.profile_id)
            _, reps = fit_with_replicates(samples, options=options)
        except (FailedPrecondition, InvalidArgument):
            reps = []
        self._remember(cm.id, reps)
        return reps

    def get(self, id: str) -> CostModel:
        if not id:
            raise InvalidArgument(
                "COST_MODEL_ID_REQUIRED", "cost_model_id is required", field="cost_model_id"
            )
        return self.store.get_cost_model(id)

    def list_models(
        self, page_size: int, page_token: str, profile_id: str = ""
    ) -> tuple[list[CostModel], str]:
        return self.store.list_cost_models(page_size, page_token, profile_id)

    # ---- estimating ----

    def estimate(
        self, cm_id: str, p: Sequence[int], o: Sequence[int], *, per_query: bool
    ) -> EstimateResult:
        cm = self.get(cm_id)
        if len(p) == 0:
            raise InvalidArgument(
                "QUERIES_REQUIRED", "queries: give at least one query", field="queries"
            )
        wl = estimate_workload(cm, p, o, keep_runtimes=True)
        pa = np.asarray(p, dtype=np.int64)
        oa = np.asarray(o, dtype=np.int64)
        reps = self.replicates(cm)
        low = high = None
        sum_iv = None
        if reps:
            low, high = predict_interval(reps, pa, oa)
            totals = np.array([estimate_workload(r, pa, oa).total_s for r in reps])
            sum_iv = (float(np.quantile(totals, 0.025)), float(np.quantile(totals, 0.975)))
        return EstimateResult(
            workload=wl,
            runtime_s=wl.runtimes_s if per_query else None,
            low_s=low if per_query else None,
            high_s=high if per_query else None,
            out_of_domain=_ood(cm, pa, oa) if per_query else None,
            sum_interval=sum_iv,
        )

    def stream_estimate(
        self, chunks: Iterable[tuple[str, Sequence[int], Sequence[int]]]
    ) -> WorkloadEstimate:
        acc: WorkloadAccumulator | None = None
        first_id = ""
        for cm_id, p, o in chunks:
            if acc is None:
                first_id = cm_id
                acc = WorkloadAccumulator(self.get(cm_id))
            elif cm_id and cm_id != first_id:
                raise InvalidArgument(
                    "COST_MODEL_CHANGED",
                    "cost_model_id must be the same in every chunk",
                    field="cost_model_id",
                )
            acc.add(p, o)
        if acc is None:
            raise InvalidArgument(
                "QUERIES_REQUIRED", "the stream carried no chunk", field="cost_model_id"
            )
        return acc.result()

    # ---- the rest of issue 4 ----

    def denoise(
        self, profile_id: str, method: str, quantile: float, *, request_id: str = "", name: str = ""
    ) -> CostModel:
        from idealrt.services.metrics.denoise import denoise

        if not 0.0 < quantile < 0.5:
            raise InvalidArgument(
                "QUANTILE_INVALID",
                f"quantile must be in (0, 0.5), got {quantile}",
                field="quantile",
            )
        # black-box API measurements are contended by nature: INVALID profiles are accepted
        prof, samples = self._fit_samples(profile_id, allow_invalid=True)
        cm = denoise(samples, method, quantile, profile_id=profile_id)  # type: ignore[arg-type]
        cm.request_id = request_id
        cm.name = name or f"{prof.model.name}-denoised-{method}"
        cm.model_name = prof.model.name
        cm.create_time = utcnow()
        return self.store.create_cost_model(cm)[0]

    def samples_of(self, profile_id: str) -> list[Sample]:
        return self._fit_samples(profile_id)[1]

    def import_helm(self, doc: Mapping[str, object], kind: str, request_id: str) -> list[CostModel]:
        from idealrt.services.metrics.helm import import_helm

        if kind not in ("idealized", "denoised", ""):
            raise InvalidArgument(
                "KIND_INVALID", "kind must be idealized or denoised", field="kind"
            )
        out = []
        for name, cm in import_helm(doc).items():
            cm.name = name
            cm.model_name = name
            cm.request_id = f"{request_id}:{name}" if request_id else ""
            cm.create_time = utcnow()
            out.append(self.store.create_cost_model(cm)[0])
        return out

    def export_helm(
        self, ids: Mapping[str, str], prompt_sizes: Sequence[int]
    ) -> dict[str, dict[str, object]]:
        from idealrt.services.metrics.helm import export_helm

        if not ids:
            raise InvalidArgument(
                "COST_MODEL_IDS_REQUIRED", "name at least one cost model", field="cost_model_ids"
            )
        models = {name: self.get(cid) for name, cid in ids.items()}
        return export_helm(models, list(prompt_sizes) or None)

    def spec_for(self, cm: CostModel, given: ModelSpec | None) -> ModelSpec | None:
        if given is not None:
            return given
        if cm.profile_id:
            try:
                prof = self.store.get_profile(cm.profile_id)
            except Exception:
                return None
            if prof.model_spec is not None:
                return prof.model_spec
            if prof.model.spec is not None:
                return prof.model.spec
            if prof.model.name:
                from idealrt.core.catalog import CATALOG

                return CATALOG.get(prof.model.name)
        return None
