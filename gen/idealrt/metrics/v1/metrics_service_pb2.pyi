from idealrt.common.v1 import common_pb2 as _common_pb2
from idealrt.common.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENOISE_METHOD_UNSPECIFIED: _ClassVar[DenoiseMethod]
    DENOISE_METHOD_MIN: _ClassVar[DenoiseMethod]
    DENOISE_METHOD_QUANTILE: _ClassVar[DenoiseMethod]
DENOISE_METHOD_UNSPECIFIED: DenoiseMethod
DENOISE_METHOD_MIN: DenoiseMethod
DENOISE_METHOD_QUANTILE: DenoiseMethod

class FitOptions(_message.Message):
    __slots__ = ("fit_overhead", "bootstrap", "constant_beta", "seed")
    FIT_OVERHEAD_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_BETA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    fit_overhead: bool
    bootstrap: int
    constant_beta: bool
    seed: int
    def __init__(self, fit_overhead: _Optional[bool] = ..., bootstrap: _Optional[int] = ..., constant_beta: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class FitCostModelRequest(_message.Message):
    __slots__ = ("request_id", "profile_id", "options", "name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    profile_id: str
    options: FitOptions
    name: str
    def __init__(self, request_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., options: _Optional[_Union[FitOptions, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class FitCostModelResponse(_message.Message):
    __slots__ = ("cost_model",)
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    cost_model: _resources_pb2.CostModel
    def __init__(self, cost_model: _Optional[_Union[_resources_pb2.CostModel, _Mapping]] = ...) -> None: ...

class GetCostModelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetCostModelResponse(_message.Message):
    __slots__ = ("cost_model",)
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    cost_model: _resources_pb2.CostModel
    def __init__(self, cost_model: _Optional[_Union[_resources_pb2.CostModel, _Mapping]] = ...) -> None: ...

class ListCostModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "profile_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    profile_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., profile_id: _Optional[str] = ...) -> None: ...

class ListCostModelsResponse(_message.Message):
    __slots__ = ("cost_models", "next_page_token")
    COST_MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cost_models: _containers.RepeatedCompositeFieldContainer[_resources_pb2.CostModel]
    next_page_token: str
    def __init__(self, cost_models: _Optional[_Iterable[_Union[_resources_pb2.CostModel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("prompt_tokens", "output_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    output_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class QueryEstimate(_message.Message):
    __slots__ = ("runtime_seconds", "low_seconds", "high_seconds", "out_of_domain")
    RUNTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HIGH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    runtime_seconds: float
    low_seconds: float
    high_seconds: float
    out_of_domain: bool
    def __init__(self, runtime_seconds: _Optional[float] = ..., low_seconds: _Optional[float] = ..., high_seconds: _Optional[float] = ..., out_of_domain: _Optional[bool] = ...) -> None: ...

class WorkloadSummary(_message.Message):
    __slots__ = ("count", "sum_seconds", "mean_seconds", "p50_seconds", "p90_seconds", "p99_seconds", "out_of_domain", "sum_low_seconds", "sum_high_seconds")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SUM_LOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SUM_HIGH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    sum_seconds: float
    mean_seconds: float
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float
    out_of_domain: int
    sum_low_seconds: float
    sum_high_seconds: float
    def __init__(self, count: _Optional[int] = ..., sum_seconds: _Optional[float] = ..., mean_seconds: _Optional[float] = ..., p50_seconds: _Optional[float] = ..., p90_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ..., out_of_domain: _Optional[int] = ..., sum_low_seconds: _Optional[float] = ..., sum_high_seconds: _Optional[float] = ...) -> None: ...

class EstimateRuntimeRequest(_message.Message):
    __slots__ = ("cost_model_id", "queries", "per_query", "intervals", "prompt_tokens", "output_tokens")
    COST_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    INTERVALS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cost_model_id: str
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    per_query: bool
    intervals: bool
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cost_model_id: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., per_query: _Optional[bool] = ..., intervals: _Optional[bool] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class EstimateRuntimeResponse(_message.Message):
    __slots__ = ("estimates", "summary", "runtime_seconds", "low_seconds", "high_seconds", "out_of_domain")
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HIGH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    estimates: _containers.RepeatedCompositeFieldContainer[QueryEstimate]
    summary: WorkloadSummary
    runtime_seconds: _containers.RepeatedScalarFieldContainer[float]
    low_seconds: _containers.RepeatedScalarFieldContainer[float]
    high_seconds: _containers.RepeatedScalarFieldContainer[float]
    out_of_domain: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, estimates: _Optional[_Iterable[_Union[QueryEstimate, _Mapping]]] = ..., summary: _Optional[_Union[WorkloadSummary, _Mapping]] = ..., runtime_seconds: _Optional[_Iterable[float]] = ..., low_seconds: _Optional[_Iterable[float]] = ..., high_seconds: _Optional[_Iterable[float]] = ..., out_of_domain: _Optional[_Iterable[bool]] = ...) -> None: ...

class StreamEstimateRuntimeRequest(_message.Message):
    __slots__ = ("cost_model_id", "prompt_tokens", "output_tokens")
    COST_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cost_model_id: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cost_model_id: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamEstimateRuntimeResponse(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: WorkloadSummary
    def __init__(self, summary: _Optional[_Union[WorkloadSummary, _Mapping]] = ...) -> None: ...

class DenoiseCostModelRequest(_message.Message):
    __slots__ = ("request_id", "profile_id", "method", "quantile", "name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    profile_id: str
    method: DenoiseMethod
    quantile: float
    name: str
    def __init__(self, request_id: _Optional[str] = ..., profile_id: _Optional[str] = ..., method: _Optional[_Union[DenoiseMethod, str]] = ..., quantile: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class DenoiseCostModelResponse(_message.Message):
    __slots__ = ("cost_model",)
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    cost_model: _resources_pb2.CostModel
    def __init__(self, cost_model: _Optional[_Union[_resources_pb2.CostModel, _Mapping]] = ...) -> None: ...

class ComputeCostRequest(_message.Message):
    __slots__ = ("cost_model_id", "queries", "accelerator", "model_spec", "dtype", "max_context", "reserve_fraction", "power_of_two", "price_per_hour_usd", "grid_g_co2_per_kwh", "prompt_tokens", "output_tokens")
    class PricePerHourUsdEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COST_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    POWER_OF_TWO_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_HOUR_USD_FIELD_NUMBER: _ClassVar[int]
    GRID_G_CO2_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cost_model_id: str
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    accelerator: str
    model_spec: _common_pb2.ModelSpec
    dtype: _common_pb2.DType
    max_context: int
    reserve_fraction: float
    power_of_two: bool
    price_per_hour_usd: _containers.ScalarMap[str, float]
    grid_g_co2_per_kwh: float
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cost_model_id: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., accelerator: _Optional[str] = ..., model_spec: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., max_context: _Optional[int] = ..., reserve_fraction: _Optional[float] = ..., power_of_two: _Optional[bool] = ..., price_per_hour_usd: _Optional[_Mapping[str, float]] = ..., grid_g_co2_per_kwh: _Optional[float] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ComputeCostResponse(_message.Message):
    __slots__ = ("accelerators", "runtime_seconds", "accelerator_seconds", "dollars", "energy_joules", "energy_source", "co2_grams", "energy_error")
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CO2_GRAMS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_ERROR_FIELD_NUMBER: _ClassVar[int]
    accelerators: int
    runtime_seconds: float
    accelerator_seconds: float
    dollars: float
    energy_joules: float
    energy_source: str
    co2_grams: float
    energy_error: str
    def __init__(self, accelerators: _Optional[int] = ..., runtime_seconds: _Optional[float] = ..., accelerator_seconds: _Optional[float] = ..., dollars: _Optional[float] = ..., energy_joules: _Optional[float] = ..., energy_source: _Optional[str] = ..., co2_grams: _Optional[float] = ..., energy_error: _Optional[str] = ...) -> None: ...

class ComputeRooflineRequest(_message.Message):
    __slots__ = ("model_spec", "dtype", "accelerator", "peak_flops", "bandwidth_bytes_per_second", "prompt_tokens", "contexts", "cost_model_id")
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    PEAK_FLOPS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_spec: _common_pb2.ModelSpec
    dtype: _common_pb2.DType
    accelerator: str
    peak_flops: float
    bandwidth_bytes_per_second: float
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    contexts: _containers.RepeatedScalarFieldContainer[int]
    cost_model_id: str
    def __init__(self, model_spec: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., accelerator: _Optional[str] = ..., peak_flops: _Optional[float] = ..., bandwidth_bytes_per_second: _Optional[float] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., contexts: _Optional[_Iterable[int]] = ..., cost_model_id: _Optional[str] = ...) -> None: ...

class RooflinePoint(_message.Message):
    __slots__ = ("tokens", "lower_bound_seconds", "fitted_seconds", "fraction_of_bound")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOWER_BOUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FITTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_OF_BOUND_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    lower_bound_seconds: float
    fitted_seconds: float
    fraction_of_bound: float
    def __init__(self, tokens: _Optional[int] = ..., lower_bound_seconds: _Optional[float] = ..., fitted_seconds: _Optional[float] = ..., fraction_of_bound: _Optional[float] = ...) -> None: ...

class ComputeRooflineResponse(_message.Message):
    __slots__ = ("prefill", "decode")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    prefill: _containers.RepeatedCompositeFieldContainer[RooflinePoint]
    decode: _containers.RepeatedCompositeFieldContainer[RooflinePoint]
    def __init__(self, prefill: _Optional[_Iterable[_Union[RooflinePoint, _Mapping]]] = ..., decode: _Optional[_Iterable[_Union[RooflinePoint, _Mapping]]] = ...) -> None: ...

class CompareCostModelsRequest(_message.Message):
    __slots__ = ("profile_id_a", "profile_id_b", "queries", "bootstrap", "seed", "prompt_tokens", "output_tokens")
    PROFILE_ID_A_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_B_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    profile_id_a: str
    profile_id_b: str
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    bootstrap: int
    seed: int
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, profile_id_a: _Optional[str] = ..., profile_id_b: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., bootstrap: _Optional[int] = ..., seed: _Optional[int] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class CompareCostModelsResponse(_message.Message):
    __slots__ = ("ratio", "ratio_low", "ratio_high", "significant", "a_total_seconds", "b_total_seconds")
    RATIO_FIELD_NUMBER: _ClassVar[int]
    RATIO_LOW_FIELD_NUMBER: _ClassVar[int]
    RATIO_HIGH_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANT_FIELD_NUMBER: _ClassVar[int]
    A_TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    B_TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    ratio_low: float
    ratio_high: float
    significant: bool
    a_total_seconds: float
    b_total_seconds: float
    def __init__(self, ratio: _Optional[float] = ..., ratio_low: _Optional[float] = ..., ratio_high: _Optional[float] = ..., significant: _Optional[bool] = ..., a_total_seconds: _Optional[float] = ..., b_total_seconds: _Optional[float] = ...) -> None: ...

class ExportHelmRequest(_message.Message):
    __slots__ = ("cost_model_ids", "prompt_tokens")
    class CostModelIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COST_MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cost_model_ids: _containers.ScalarMap[str, str]
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cost_model_ids: _Optional[_Mapping[str, str]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ExportHelmResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class ImportHelmRequest(_message.Message):
    __slots__ = ("request_id", "json", "kind", "namespace")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    json: str
    kind: str
    namespace: str
    def __init__(self, request_id: _Optional[str] = ..., json: _Optional[str] = ..., kind: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class ImportHelmResponse(_message.Message):
    __slots__ = ("cost_models",)
    COST_MODELS_FIELD_NUMBER: _ClassVar[int]
    cost_models: _containers.RepeatedCompositeFieldContainer[_resources_pb2.CostModel]
    def __init__(self, cost_models: _Optional[_Iterable[_Union[_resources_pb2.CostModel, _Mapping]]] = ...) -> None: ...

class ComputeParetoRequest(_message.Message):
    __slots__ = ("cost_model_ids", "queries", "accuracy_csv", "prompt_tokens", "output_tokens")
    class CostModelIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COST_MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_CSV_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cost_model_ids: _containers.ScalarMap[str, str]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    accuracy_csv: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cost_model_ids: _Optional[_Mapping[str, str]] = ..., queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., accuracy_csv: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ParetoPoint(_message.Message):
    __slots__ = ("model", "cost_seconds", "accuracy", "on_frontier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ON_FRONTIER_FIELD_NUMBER: _ClassVar[int]
    model: str
    cost_seconds: float
    accuracy: float
    on_frontier: bool
    def __init__(self, model: _Optional[str] = ..., cost_seconds: _Optional[float] = ..., accuracy: _Optional[float] = ..., on_frontier: _Optional[bool] = ...) -> None: ...

class ComputeParetoResponse(_message.Message):
    __slots__ = ("rows", "missing_cost", "missing_accuracy")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MISSING_COST_FIELD_NUMBER: _ClassVar[int]
    MISSING_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[ParetoPoint]
    missing_cost: _containers.RepeatedScalarFieldContainer[str]
    missing_accuracy: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rows: _Optional[_Iterable[_Union[ParetoPoint, _Mapping]]] = ..., missing_cost: _Optional[_Iterable[str]] = ..., missing_accuracy: _Optional[_Iterable[str]] = ...) -> None: ...
