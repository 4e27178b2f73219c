"""The metrics service's use cases over the store: fit, estimate, denoise, cost, roofline,
compare, Pareto, HELM import/export. Plain domain code; the servicer only converts.

One module because it is one idea: the service's use-case layer. Each method validates its
request (`validate`, within the limits of MetricsConfig), reads what it needs from the
store, runs the cost-model mathematics (`idealrt.core.costmodel`) or a metric function of
this service, and returns plain dataclasses. Failures surface: a store that is down is
UNAVAILABLE (the store client's error, never caught here), a missing model spec is
FAILED_PRECONDITION naming what is missing, energy readings that cannot be used are
reported in `CostResult.energy_error`, and a model derived here (fit, denoised, imported)
is stored only when it passes `core.costmodel.validate.check_cost_model`.
Bootstrap work happens only when a caller asks for intervals.

Caches (bounded LRU, single-flight: concurrent misses on one key do the work once):
- Cost models, prepared for evaluation (`core.costmodel.predict.PreparedModel`), by id.
  The store never changes a stored cost model: it has CreateCostModel, GetCostModel and
  ListCostModels and no update or delete (services/store/repository.py only ever inserts
  into cost_models). So an id names one model for the store's lifetime, and the cache is
  keyed by the id a request carries. Each entry records the model's revision (a digest of
  the whole record, create_time included); what can still change a model under its id is
  the store itself being replaced or restored out of band, so an entry is re-read after
  `model_ttl_s` (and whenever the store hands the engine a copy, as a list does), and a
  different revision replaces the entry and everything derived from it. A re-read that
  finds the same revision keeps the prepared model and its replicates.
  Authorization is never cached: every call checks the cached model against the current
  caller (`visible_cost_model`), so a hidden model is the same NOT_FOUND as a missing id.
  Misses and store errors are not cached.
- Bootstrap replicates, as a `ReplicateSet`, by (id, revision): stored by a fit, else
  re-derived from the profile's samples with the fit's recorded options (same seed, same
  result) on the first estimate that asks for intervals."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from idealrt.core import hardware
from idealrt.core.catalog import CATALOG
from idealrt.core.clock import utcnow
from idealrt.core.costmodel.bootstrap import ReplicateSet, prepare_replicates
from idealrt.core.costmodel.estimate import (
    WorkloadAccumulator,
    WorkloadEstimate,
    estimate_workload,
    validate_queries,
)
from idealrt.core.costmodel.fit import FitOptions, fit_with_replicates
from idealrt.core.costmodel.options import DEFAULT_BOOTSTRAP
from idealrt.core.costmodel.predict import PreparedModel, prepare
from idealrt.core.costmodel.validate import check_cost_model
from idealrt.core.domain import DEFAULT_NAMESPACE, CostModel, Profile, ProfileState, Sample
from idealrt.core.errors import FailedPrecondition, InvalidArgument, NotFound
from idealrt.core.logging import get_logger
from idealrt.core.model_spec import ModelSpec, resolve_max_context
from idealrt.core.namespaces import (
    profile_not_found,
    readable,
    require_writer,
    visible_cost_model,
    visible_profile,
)
from idealrt.core.reasons import QUERIES_INVALID, QUERIES_REQUIRED
from idealrt.services.metrics import validate
from idealrt.services.metrics._cache import SingleFlightCache
from idealrt.services.metrics.compare import Comparison, compare
from idealrt.services.metrics.cost import (
    CostBreakdown,
    EnergyModel,
    accelerators_needed,
    cost_of,
    fit_energy_model,
)
from idealrt.services.metrics.pareto import ParetoResult, pareto_frontier
from idealrt.services.metrics.reasons import (
    ACCELERATOR_REQUIRED,
    COST_MODEL_CHANGED,
    COST_MODEL_DEGENERATE,
    COST_MODEL_ID_REQUIRED,
    COST_MODEL_IDS_REQUIRED,
    MODEL_SPEC_MISSING,
    PROFILE_ID_REQUIRED,
    PROFILE_INVALID,
    PROFILE_NOT_SUCCEEDED,
)
from idealrt.services.metrics.roofline import MeasuredHardware, fraction_of_bound, roofline
from idealrt.services.metrics.validate import (
    MAX_COMPARE_BOOTSTRAP,
    MAX_FIT_BOOTSTRAP,
    RequestLimits,
)

__all__ = [
    "MAX_COMPARE_BOOTSTRAP",
    "MAX_FIT_BOOTSTRAP",
    "CostRequest",
    "CostResult",
    "EstimateResult",
    "MetricsEngine",
    "MetricsStore",
    "RooflinePoint",
    "RooflineRequest",
    "RooflineResult",
]

DEFAULT_MODEL_CACHE = 256  # prepared cost models held
DEFAULT_REPLICATE_CACHE = 32  # replicate sets held (each up to R x knots floats)
DEFAULT_MODEL_TTL_S = 60.0  # a cached model is re-read from the store after this
DEFAULT_ROOFLINE_PROMPTS = (1, 128, 512)
DEFAULT_ROOFLINE_CONTEXTS = (128, 512)

FloatArray = npt.NDArray[np.float64]
# a token-count column: a sequence of ints, or a 1-D array of them
Tokens = Sequence[int] | npt.NDArray[np.integer[Any]]
_log = get_logger(__name__)


class MetricsStore(Protocol):
    def get_profile(self, id: str) -> Profile: ...
    def all_samples(self, profile_id: str) -> list[Sample]: ...
    def create_cost_model(self, cm: CostModel) -> tuple[CostModel, bool]: ...
    def get_cost_model(self, id: str) -> CostModel: ...
    def list_cost_models(
        self,
        page_size: int = 0,
        page_token: str = "",
        profile_id: str = "",
        *,
        namespaces: frozenset[str] = ...,
    ) -> tuple[list[CostModel], str]: ...


@dataclasses.dataclass(frozen=True)
class EstimateResult:
    workload: WorkloadEstimate
    runtime_s: FloatArray | None  # per query, when asked
    low_s: FloatArray | None
    high_s: FloatArray | None
    out_of_domain: npt.NDArray[np.bool_] | None
    sum_interval: tuple[float, float] | None


@dataclasses.dataclass(frozen=True)
class CostRequest:
    """What ComputeCost prices: a workload on a cost model, on `accelerator`. `spec` None:
    the spec of the model the cost model's profile measured (catalog name or stored spec).
    `max_context` 0: the model's positions."""

    cost_model_id: str
    prompt_tokens: Tokens
    output_tokens: Tokens
    accelerator: str
    spec: ModelSpec | None = None
    dtype: str = "fp16"
    max_context: int = 0
    reserve_fraction: float = 0.1
    power_of_two: bool = False
    prices: Mapping[str, float] | None = None
    grid_g_co2_per_kwh: float | None = None
    columns: bool = False  # the queries came as packed columns (errors name prompt_tokens[i])


@dataclasses.dataclass(frozen=True)
class CostResult:
    accelerators: int
    runtime_s: float
    breakdown: CostBreakdown
    energy_error: str = ""  # why measured energy could not be used ("" when it was or none)


@dataclasses.dataclass(frozen=True)
class RooflineRequest:
    """Bounds of `spec` on a table accelerator, or on measured limits when both
    `peak_flops` and `bandwidth_bytes_s` are > 0; with a cost model, the fraction of the
    bounds its fit reaches. Empty sizes: the defaults."""

    spec: ModelSpec
    dtype: str
    accelerator: str = ""
    peak_flops: float = 0.0
    bandwidth_bytes_s: float = 0.0
    prompt_tokens: Sequence[int] = ()
    contexts: Sequence[int] = ()
    cost_model_id: str = ""


@dataclasses.dataclass(frozen=True)
class RooflinePoint:
    tokens: int
    lower_bound_s: float
    fitted_s: float = 0.0  # 0 without a cost model
    fraction_of_bound: float = 0.0


@dataclasses.dataclass(frozen=True)
class RooflineResult:
    prefill: tuple[RooflinePoint, ...]
    decode: tuple[RooflinePoint, ...]


def _points(
    tokens: Sequence[int], lower: FloatArray, fitted: FloatArray, fraction: FloatArray
) -> tuple[RooflinePoint, ...]:
    return tuple(
        RooflinePoint(int(t), float(lo), float(f), float(fr))
        for t, lo, f, fr in zip(tokens, lower, fitted, fraction, strict=True)
    )


def _require_queries(p: Tokens) -> None:
    if len(p) == 0:
        raise InvalidArgument(QUERIES_REQUIRED, "queries: give at least one query", field="queries")


def _fit_options(cm: CostModel) -> FitOptions:
    """The options `cm` was fitted with (stored with it), so its replicates after a restart
    are the ones its intervals came from. A model stored before options were recorded gets
    the defaults with its beta mode, as before; an unreadable record the same, logged, and
    so does a record no fit here could have written (invalid, or more replicates than
    MAX_FIT_BOOTSTRAP: re-deriving them would hold a worker for as long as it asks)."""
    fallback = FitOptions(beta_linear=cm.beta1_s != 0)
    if not cm.fit_options:
        return fallback
    try:
        options = FitOptions.from_record(cm.fit_options)
        validate.check_fit_options(options)
    except ValueError as e:
        _log.warning("fit_options_unreadable", cost_model_id=cm.id, error=str(e))
        return fallback
    except InvalidArgument as e:
        _log.warning("fit_options_invalid", cost_model_id=cm.id, field=e.field, error=str(e))
        return fallback
    return options


def _usable(cm: CostModel, what: str, profile_id: str) -> CostModel:
    """`cm`, which this engine derived from a profile's samples, if it is a consistent
    cost model (core.costmodel.validate); else FAILED_PRECONDITION: the samples, not the
    request, cannot give a model every later estimate can evaluate."""
    try:
        check_cost_model(cm)
    except InvalidArgument as e:
        raise FailedPrecondition(
            COST_MODEL_DEGENERATE,
            f"the {what} of profile {profile_id} is not a usable cost model ({e.message}); "
            "it was not stored",
            field="profile_id",
        ) from None
    return cm


def _queries_field(columns: bool) -> str:
    return "prompt_tokens" if columns else "queries"


def revision_of(cm: CostModel) -> str:
    """A digest of the whole record (create_time included): two reads of one stored model
    agree; a model replaced under its id does not."""
    return hashlib.blake2b(repr(cm).encode(), digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class _Loaded:
    """A cached cost model: prepared, its revision, when it was read (engine clock)."""

    prepared: PreparedModel
    revision: str
    read_at: float


_NO_REPLICATES = prepare_replicates(())


class MetricsEngine:
    """Fits are stored; cost models are cached prepared, and their bootstrap replicates
    (for intervals on estimates) are cached too and re-derived from the profile's samples
    (same seed, same result) on a miss; see the module doc. `model_cache` and
    `replicate_cache` bound the two caches (entries), `model_ttl_s` is how long a cached
    model is used before it is re-read (None: never), `clock` the monotonic clock that
    measures it."""

    def __init__(
        self,
        store: MetricsStore,
        replicate_cache: int = DEFAULT_REPLICATE_CACHE,
        *,
        limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen, never mutated
        model_cache: int = DEFAULT_MODEL_CACHE,
        model_ttl_s: float | None = DEFAULT_MODEL_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.limits = limits
        self._models: SingleFlightCache[str, _Loaded] = SingleFlightCache(model_cache)
        self._replicates: SingleFlightCache[tuple[str, str], ReplicateSet] = SingleFlightCache(
            replicate_cache
        )
        self._ttl = model_ttl_s
        self._clock = clock

    # ---- fitting ----

    def _fit_samples(
        self, profile_id: str, *, allow_invalid: bool = False
    ) -> tuple[Profile, list[Sample]]:
        if not profile_id:
            raise InvalidArgument(PROFILE_ID_REQUIRED, "profile_id is required", field="profile_id")
        # NOT_FOUND, as if it did not exist, when the caller may not read its namespace:
        # missing or hidden, the same error (field profile_id in both)
        try:
            stored = self.store.get_profile(profile_id)
        except NotFound:
            raise profile_not_found(profile_id, field="profile_id") from None
        prof = visible_profile(stored, field="profile_id")
        if prof.state == ProfileState.INVALID and not allow_invalid:
            raise FailedPrecondition(
                PROFILE_INVALID,
                f"profile {profile_id} ended INVALID (measured under contention: {prof.error}); "
                "an idealized cost model is never fitted to it",
                field="profile_id",
            )
        if prof.state != ProfileState.SUCCEEDED and not (
            allow_invalid and prof.state == ProfileState.INVALID
        ):
            raise FailedPrecondition(
                PROFILE_NOT_SUCCEEDED,
                f"profile {profile_id} is {prof.state.value}; fit a SUCCEEDED profile",
                field="profile_id",
            )
        return prof, self.store.all_samples(profile_id)

    def fit(
        self, profile_id: str, options: FitOptions, *, request_id: str = "", name: str = ""
    ) -> CostModel:
        validate.check_fit_options(options)
        prof, samples = self._fit_samples(profile_id)
        require_writer(prof.namespace)  # the model is stored beside its profile
        cm, reps = fit_with_replicates(samples, options=options, profile_id=profile_id)
        _usable(cm, "fit", profile_id)
        cm.namespace = prof.namespace
        # the options the model came from (a fit that fell back to the medians says so)
        cm.fit_options = cm.fit_options or options.to_record()
        cm.request_id = request_id
        cm.name = name or f"{prof.model.name}-{prof.stack.backend.value}-{prof.stack.device}"
        cm.model_name = prof.model.name
        cm.stack = prof.stack
        cm.create_time = utcnow()
        stored, created = self.store.create_cost_model(cm)
        entry = self._cache(stored)
        # a replay returns the model stored first: these replicates are its own only when
        # it was fitted with these options (else they are re-derived from its own)
        if created or stored.fit_options == cm.fit_options:
            self._replicates.put((stored.id, entry.revision), prepare_replicates(reps))
        return stored

    # ---- the caches ----

    def _cache(self, cm: CostModel) -> _Loaded:
        """Cache `cm`, as the store just returned it (created or listed)."""
        entry = _Loaded(prepare(cm), revision_of(cm), self._clock())
        self._models.put(cm.id, entry)
        return entry

    def _observe(self, cm: CostModel) -> None:
        """A copy of `cm` from the store: a cached entry of another revision is dropped."""
        entry = self._models.peek(cm.id)
        if entry is not None and entry.revision != revision_of(cm):
            _log.warning("cost_model_changed", cost_model_id=cm.id)
            self._models.invalidate(cm.id)

    def _fresh(self, entry: _Loaded) -> bool:
        return self._ttl is None or self._clock() - entry.read_at < self._ttl

    def _read(self, cm_id: str, stale: _Loaded | None) -> _Loaded:
        """The store's copy of `cm_id`, prepared; `stale`'s preparation when unchanged."""
        cm = self.store.get_cost_model(cm_id)
        revision = revision_of(cm)
        now = self._clock()
        if stale is not None and stale.revision == revision:
            return dataclasses.replace(stale, read_at=now)
        if stale is not None:
            _log.warning("cost_model_changed", cost_model_id=cm_id)
        return _Loaded(prepare(cm), revision, now)

    def _loaded(self, id: str) -> _Loaded:
        """The cached (else read) model `id`, if the current caller may read it: NOT_FOUND
        as for a missing id otherwise, on every call."""
        if not id:
            raise InvalidArgument(
                COST_MODEL_ID_REQUIRED, "cost_model_id is required", field="cost_model_id"
            )
        entry = self._models.get(id, lambda stale: self._read(id, stale), fresh=self._fresh)
        visible_cost_model(entry.prepared.model)
        return entry

    def invalidate(self, cm_id: str) -> None:
        """Forget the cached model `cm_id` (its replicates go with its revision)."""
        self._models.invalidate(cm_id)

    def replicate_set(self, cm: CostModel, revision: str = "") -> ReplicateSet:
        """The bootstrap replicates of `cm` (revision: `revision_of(cm)`, when known), from
        the cache, else re-derived once from its profile's samples (empty when the model
        has none to come from or the samples no longer give a fit)."""
        if cm.kind != "idealized" or not cm.profile_id:
            return _NO_REPLICATES
        key = (cm.id, revision or revision_of(cm))
        return self._replicates.get(key, lambda _: self._derive_replicates(cm))

    def _derive_replicates(self, cm: CostModel) -> ReplicateSet:
        try:
            options = _fit_options(cm)
            _, samples = self._fit_samples(cm.profile_id)
            _, reps = fit_with_replicates(samples, options=options)
        except (FailedPrecondition, InvalidArgument):
            reps = []
        return prepare_replicates(reps)

    def replicates(self, cm: CostModel) -> list[CostModel]:
        """The replicate models of `replicate_set(cm)`."""
        return list(self.replicate_set(cm).models)

    def get(self, id: str) -> CostModel:
        """Cost model `id` (shared with the cache: never change it)."""
        return self._loaded(id).prepared.model

    def list_models(
        self, page_size: int, page_token: str, profile_id: str = ""
    ) -> tuple[list[CostModel], str]:
        """A page of the cost models in the namespaces the caller may read."""
        visible = readable()
        if visible is None:
            items, token = self.store.list_cost_models(page_size, page_token, profile_id)
        elif not visible:
            return [], ""
        else:
            items, token = self.store.list_cost_models(
                page_size, page_token, profile_id, namespaces=visible
            )
        for cm in items:
            self._observe(cm)
        return items, token

    # ---- estimating ----

    def estimate(
        self,
        cm_id: str,
        p: Tokens,
        o: Tokens,
        *,
        per_query: bool,
        intervals: bool = False,
        columns: bool = False,
    ) -> EstimateResult:
        """The workload's estimate; per query when `per_query`; 95% intervals (from the
        model's bootstrap replicates) only when `intervals`. `columns`: the queries came as
        the packed prompt_tokens/output_tokens columns, and errors name those."""
        validate.check_queries(len(p), self.limits, _queries_field(columns))
        entry = self._loaded(cm_id)
        _require_queries(p)
        pa, oa = validate_queries(p, o, columns=columns)
        model = entry.prepared
        wl = estimate_workload(model, pa, oa, keep_runtimes=per_query)
        low = high = None
        sum_iv = None
        if intervals:
            reps = self.replicate_set(model.model, entry.revision)
            if reps.size:
                band, sum_iv = reps.estimate(pa, oa, per_query=per_query)
                if band is not None:
                    low, high = band
        return EstimateResult(
            workload=wl,
            runtime_s=wl.runtimes_s if per_query else None,
            low_s=low,
            high_s=high,
            out_of_domain=model.out_of_domain(pa, oa) if per_query else None,
            sum_interval=sum_iv,
        )

    def stream_estimate(self, chunks: Iterable[tuple[str, Tokens, Tokens]]) -> WorkloadEstimate:
        acc: WorkloadAccumulator | None = None
        first_id = ""
        for i, (cm_id, p, o) in enumerate(chunks):
            if len(p) != len(o):
                raise InvalidArgument(
                    QUERIES_INVALID,
                    f"chunk {i}: prompt_tokens and output_tokens differ in length",
                    field="output_tokens",
                )
            if acc is None:
                first_id = cm_id
                acc = WorkloadAccumulator(self._loaded(cm_id).prepared)
            elif cm_id and cm_id != first_id:
                raise InvalidArgument(
                    COST_MODEL_CHANGED,
                    "cost_model_id must be the same in every chunk",
                    field="cost_model_id",
                )
            acc.add(p, o)
        if acc is None:
            raise InvalidArgument(
                QUERIES_REQUIRED, "the stream carried no chunk", field="cost_model_id"
            )
        return acc.result()

    # ---- the rest of issue 4 ----

    def denoise(
        self, profile_id: str, method: str, quantile: float, *, request_id: str = "", name: str = ""
    ) -> CostModel:
        from idealrt.services.metrics.denoise import denoise

        validate.check_quantile(quantile)
        # black-box API measurements are contended by nature: INVALID profiles are accepted
        prof, samples = self._fit_samples(profile_id, allow_invalid=True)
        require_writer(prof.namespace)
        cm = denoise(samples, method, quantile, profile_id=profile_id)  # type: ignore[arg-type]
        _usable(cm, f"{method} denoising", profile_id)
        cm.namespace = prof.namespace
        cm.request_id = request_id
        cm.name = name or f"{prof.model.name}-denoised-{method}"
        cm.model_name = prof.model.name
        cm.create_time = utcnow()
        stored = self.store.create_cost_model(cm)[0]
        self._cache(stored)
        return stored

    def samples_of(self, profile_id: str) -> list[Sample]:
        return self._fit_samples(profile_id)[1]

    def compare(
        self,
        profile_a: str,
        profile_b: str,
        p: Tokens,
        o: Tokens,
        *,
        bootstrap: int = 0,
        seed: int = 0,
        columns: bool = False,
    ) -> Comparison:
        """Total runtime of the workload on A over B, with a bootstrap interval over both
        profiles' samples (`bootstrap` 0: the default count)."""
        validate.check_queries(len(p), self.limits, _queries_field(columns))
        _require_queries(p)
        validate.check_compare(bootstrap, seed)
        pa, oa = validate_queries(p, o, columns=columns)  # before the fits, not after them
        return compare(
            self.samples_of(profile_a),
            self.samples_of(profile_b),
            pa,
            oa,
            n_boot=bootstrap or DEFAULT_BOOTSTRAP,
            seed=seed,
        )

    def pareto(
        self,
        cost_model_ids: Mapping[str, str],
        p: Tokens,
        o: Tokens,
        csv: str,
        *,
        columns: bool = False,
    ) -> ParetoResult:
        """Each named model's cost = the idealized runtime of the workload on its cost
        model, joined with the accuracies of `csv` (`model,accuracy` lines)."""
        if not cost_model_ids:
            raise InvalidArgument(
                COST_MODEL_IDS_REQUIRED, "name at least one cost model", field="cost_model_ids"
            )
        validate.check_queries(len(p), self.limits, _queries_field(columns))
        _require_queries(p)
        runtimes = {
            name: self.estimate(cid, p, o, per_query=False, columns=columns).workload.total_s
            for name, cid in cost_model_ids.items()
        }
        return pareto_frontier(csv, runtimes)

    def cost(self, req: CostRequest) -> CostResult:
        """Accelerators needed (memory), accelerator-seconds, dollars, energy and CO2 of a
        workload. Energy is measured when the cost model's profile metered it."""
        if not req.accelerator:
            raise InvalidArgument(
                ACCELERATOR_REQUIRED, "accelerator is required", field="accelerator"
            )
        validate.check_queries(len(req.prompt_tokens), self.limits, _queries_field(req.columns))
        validate.check_cost(req)
        cm = self.get(req.cost_model_id)
        r = self.estimate(
            cm.id, req.prompt_tokens, req.output_tokens, per_query=False, columns=req.columns
        )
        p, o = validate_queries(req.prompt_tokens, req.output_tokens)  # valid: estimated
        spec = self.spec_for(cm, req.spec)
        n = accelerators_needed(
            spec,
            req.dtype,
            req.accelerator,
            resolve_max_context(spec, req.max_context),
            reserve_frac=req.reserve_fraction,
            power_of_two=req.power_of_two,
        )
        energy, energy_error = self._energy_model(cm)
        c = cost_of(
            r.workload.total_s,
            n,
            req.accelerator,
            req.prices,
            energy_model=energy,
            prompt_tokens=float(np.sum(p)),
            output_tokens=float(np.sum(o)),
            requests=float(p.size),
            grid_g_co2_per_kwh=req.grid_g_co2_per_kwh,
        )
        return CostResult(
            accelerators=n, runtime_s=r.workload.total_s, breakdown=c, energy_error=energy_error
        )

    def _energy_model(self, cm: CostModel) -> tuple[EnergyModel | None, str]:
        """(energy model of the cost model's profile or None, why it could not be used).
        Only idealized models measured here have energy readings; a store outage raises."""
        if not cm.profile_id or cm.kind != "idealized":
            return None, ""
        try:
            return fit_energy_model(self.samples_of(cm.profile_id)), ""
        except (FailedPrecondition, NotFound) as e:
            _log.warning("energy_unreadable", cost_model_id=cm.id, reason=e.reason, error=str(e))
            return None, f"{e.reason}: {e}"
        except (ValueError, RuntimeError) as e:  # the non-negative least squares failed
            _log.warning("energy_fit_failed", cost_model_id=cm.id, error=str(e))
            return None, f"ENERGY_FIT_FAILED: {e}"

    def roofline(self, req: RooflineRequest) -> RooflineResult:
        """Lower bounds of prefill at each prompt size and of a decode step at each context;
        with a cost model, its fitted times and the fraction of the bound they reach."""
        validate.check_roofline(req)
        hw: hardware.Accelerator | MeasuredHardware
        if req.peak_flops > 0 and req.bandwidth_bytes_s > 0:
            hw = MeasuredHardware(
                mem_bandwidth_bytes_s=req.bandwidth_bytes_s, peak_flops_s=req.peak_flops
            )
        else:
            hw = hardware.accelerator(req.accelerator or "cpu")
        ps = list(req.prompt_tokens) or list(DEFAULT_ROOFLINE_PROMPTS)
        cs = list(req.contexts) or list(DEFAULT_ROOFLINE_CONTEXTS)
        if req.cost_model_id:
            fr = fraction_of_bound(self.get(req.cost_model_id), req.spec, hw, req.dtype, ps, cs)
            return RooflineResult(
                prefill=_points(
                    fr.prompt_tokens, fr.prefill_lower_s, fr.prefill_actual_s, fr.prefill_fraction
                ),
                decode=_points(
                    fr.contexts, fr.decode_lower_s, fr.decode_actual_s, fr.decode_fraction
                ),
            )
        return RooflineResult(
            prefill=tuple(
                RooflinePoint(p, roofline(req.spec, hw, req.dtype, p, p).prefill_s_lower)
                for p in ps
            ),
            decode=tuple(
                RooflinePoint(c, roofline(req.spec, hw, req.dtype, 1, c).decode_s_lower) for c in cs
            ),
        )

    def import_helm_json(
        self, text: str, kind: str, request_id: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> list[CostModel]:
        """`import_helm` of HELM efficiency JSON text, within the size and nesting limits
        (checked before parsing)."""
        validate.check_import_kind(kind)
        doc = validate.parse_json(text, self.limits)
        return self.import_helm(doc, kind, request_id, namespace=namespace)  # type: ignore[arg-type]

    def import_helm(
        self,
        doc: Mapping[str, object],
        kind: str,
        request_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> list[CostModel]:
        """Store the cost models of a HELM document. Every model is checked (helm's own
        rules, then core.costmodel.validate) before the first is stored."""
        from idealrt.services.metrics.helm import import_helm

        validate.check_import_kind(kind)
        require_writer(namespace)  # the models are stored there
        models = import_helm(doc)
        for name, cm in models.items():
            cm.namespace = namespace
            cm.name = name
            cm.model_name = name
            cm.request_id = f"{request_id}:{name}" if request_id else ""
            cm.create_time = utcnow()
            check_cost_model(cm)
        stored = [self.store.create_cost_model(cm)[0] for cm in models.values()]
        for cm in stored:
            self._cache(cm)
        return stored

    def export_helm(
        self, ids: Mapping[str, str], prompt_sizes: Sequence[int]
    ) -> dict[str, dict[str, object]]:
        from idealrt.services.metrics.helm import export_helm

        if not ids:
            raise InvalidArgument(
                COST_MODEL_IDS_REQUIRED, "name at least one cost model", field="cost_model_ids"
            )
        models = {name: self.get(cid) for name, cid in ids.items()}
        return export_helm(models, list(prompt_sizes) or None)

    def spec_for(self, cm: CostModel, given: ModelSpec | None) -> ModelSpec:
        """`given`, else the spec of the model `cm`'s profile measured (stored spec, else
        its catalog name). FAILED_PRECONDITION naming what is missing when there is none;
        a store that is down raises its UNAVAILABLE."""
        if given is not None:
            return given
        if not cm.profile_id:
            raise FailedPrecondition(
                MODEL_SPEC_MISSING,
                f"cost model {cm.id} has no profile to take a model spec from; give model_spec",
                field="model_spec",
            )
        try:
            prof = self.store.get_profile(cm.profile_id)
        except NotFound:
            raise FailedPrecondition(
                MODEL_SPEC_MISSING,
                f"profile {cm.profile_id} of cost model {cm.id} no longer exists; give model_spec",
                field="model_spec",
            ) from None
        for spec in (prof.model_spec, prof.model.spec):
            if spec is not None:
                return spec
        found = CATALOG.get(prof.model.name) if prof.model.name else None
        if found is None:
            raise FailedPrecondition(
                MODEL_SPEC_MISSING,
                f"profile {cm.profile_id} of cost model {cm.id} stores no model spec and its "
                f"model name {prof.model.name!r} is not in the catalog; give model_spec",
                field="model_spec",
            )
        return found
