import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from idealrt.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeasePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_POLICY_UNSPECIFIED: _ClassVar[LeasePolicy]
    LEASE_POLICY_WAIT: _ClassVar[LeasePolicy]
    LEASE_POLICY_FAIL: _ClassVar[LeasePolicy]

class TargetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_KIND_UNSPECIFIED: _ClassVar[TargetKind]
    TARGET_KIND_SERVING: _ClassVar[TargetKind]
    TARGET_KIND_HTTP: _ClassVar[TargetKind]

class ProfileState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROFILE_STATE_UNSPECIFIED: _ClassVar[ProfileState]
    PROFILE_STATE_QUEUED: _ClassVar[ProfileState]
    PROFILE_STATE_RUNNING: _ClassVar[ProfileState]
    PROFILE_STATE_SUCCEEDED: _ClassVar[ProfileState]
    PROFILE_STATE_FAILED: _ClassVar[ProfileState]
    PROFILE_STATE_CANCELLED: _ClassVar[ProfileState]
    PROFILE_STATE_INVALID: _ClassVar[ProfileState]
LEASE_POLICY_UNSPECIFIED: LeasePolicy
LEASE_POLICY_WAIT: LeasePolicy
LEASE_POLICY_FAIL: LeasePolicy
TARGET_KIND_UNSPECIFIED: TargetKind
TARGET_KIND_SERVING: TargetKind
TARGET_KIND_HTTP: TargetKind
PROFILE_STATE_UNSPECIFIED: ProfileState
PROFILE_STATE_QUEUED: ProfileState
PROFILE_STATE_RUNNING: ProfileState
PROFILE_STATE_SUCCEEDED: ProfileState
PROFILE_STATE_FAILED: ProfileState
PROFILE_STATE_CANCELLED: ProfileState
PROFILE_STATE_INVALID: ProfileState

class ProfilePlan(_message.Message):
    __slots__ = ("prompt_tokens", "output_tokens", "repeats", "warmups", "holdout_prompt_tokens", "holdout_output_tokens", "seed", "randomize", "until_ci_rel", "max_repeats", "budget", "lease", "batch_size", "adaptive_target_rel", "adaptive_max_prompt_sizes", "spread")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    WARMUPS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_CI_REL_FIELD_NUMBER: _ClassVar[int]
    MAX_REPEATS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_TARGET_REL_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_MAX_PROMPT_SIZES_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    output_tokens: _containers.RepeatedScalarFieldContainer[int]
    repeats: int
    warmups: int
    holdout_prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    holdout_output_tokens: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    randomize: bool
    until_ci_rel: float
    max_repeats: int
    budget: _duration_pb2.Duration
    lease: LeasePolicy
    batch_size: int
    adaptive_target_rel: float
    adaptive_max_prompt_sizes: int
    spread: _duration_pb2.Duration
    def __init__(self, prompt_tokens: _Optional[_Iterable[int]] = ..., output_tokens: _Optional[_Iterable[int]] = ..., repeats: _Optional[int] = ..., warmups: _Optional[int] = ..., holdout_prompt_tokens: _Optional[_Iterable[int]] = ..., holdout_output_tokens: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., randomize: _Optional[bool] = ..., until_ci_rel: _Optional[float] = ..., max_repeats: _Optional[int] = ..., budget: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease: _Optional[_Union[LeasePolicy, str]] = ..., batch_size: _Optional[int] = ..., adaptive_target_rel: _Optional[float] = ..., adaptive_max_prompt_sizes: _Optional[int] = ..., spread: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("kind", "address", "base_url", "api_model", "api_key_env", "tokenizer", "options", "credential")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    API_MODEL_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ENV_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    kind: TargetKind
    address: str
    base_url: str
    api_model: str
    api_key_env: str
    tokenizer: str
    options: _containers.ScalarMap[str, str]
    credential: str
    def __init__(self, kind: _Optional[_Union[TargetKind, str]] = ..., address: _Optional[str] = ..., base_url: _Optional[str] = ..., api_model: _Optional[str] = ..., api_key_env: _Optional[str] = ..., tokenizer: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., credential: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("gpu_product", "node_pool", "whole_node")
    GPU_PRODUCT_FIELD_NUMBER: _ClassVar[int]
    NODE_POOL_FIELD_NUMBER: _ClassVar[int]
    WHOLE_NODE_FIELD_NUMBER: _ClassVar[int]
    gpu_product: str
    node_pool: str
    whole_node: bool
    def __init__(self, gpu_product: _Optional[str] = ..., node_pool: _Optional[str] = ..., whole_node: _Optional[bool] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("id", "model", "stack", "plan", "target", "state", "request_id", "create_time", "start_time", "end_time", "completed_samples", "total_samples", "error", "provenance", "model_spec", "namespace", "placement", "queue_position")
    class ProvenanceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: _common_pb2.ModelRef
    stack: _common_pb2.StackSpec
    plan: ProfilePlan
    target: Target
    state: ProfileState
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    completed_samples: int
    total_samples: int
    error: str
    provenance: _containers.ScalarMap[str, str]
    model_spec: _common_pb2.ModelSpec
    namespace: str
    placement: Placement
    queue_position: int
    def __init__(self, id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., stack: _Optional[_Union[_common_pb2.StackSpec, _Mapping]] = ..., plan: _Optional[_Union[ProfilePlan, _Mapping]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., state: _Optional[_Union[ProfileState, str]] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_samples: _Optional[int] = ..., total_samples: _Optional[int] = ..., error: _Optional[str] = ..., provenance: _Optional[_Mapping[str, str]] = ..., model_spec: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., namespace: _Optional[str] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., queue_position: _Optional[int] = ...) -> None: ...

class FitQuality(_message.Message):
    __slots__ = ("method", "points", "mean_rel", "p95_rel", "max_rel")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MEAN_REL_FIELD_NUMBER: _ClassVar[int]
    P95_REL_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_FIELD_NUMBER: _ClassVar[int]
    method: str
    points: int
    mean_rel: float
    p95_rel: float
    max_rel: float
    def __init__(self, method: _Optional[str] = ..., points: _Optional[int] = ..., mean_rel: _Optional[float] = ..., p95_rel: _Optional[float] = ..., max_rel: _Optional[float] = ...) -> None: ...

class Interval(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class CostModel(_message.Message):
    __slots__ = ("id", "profile_id", "alpha_knots_p", "alpha_knots_seconds", "beta0_seconds", "beta1_seconds", "overhead_seconds", "request_id", "name", "kind", "quality", "intervals", "valid_prompt_tokens_min", "valid_prompt_tokens_max", "valid_output_tokens_min", "valid_output_tokens_max", "create_time", "model_name", "stack", "fit_options", "namespace")
    class IntervalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Interval
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Interval, _Mapping]] = ...) -> None: ...
    class FitOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_ID_FIELD_NUMBER: _ClassVar[int]
    ALPHA_KNOTS_P_FIELD_NUMBER: _ClassVar[int]
    ALPHA_KNOTS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BETA0_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BETA1_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    INTERVALS_FIELD_NUMBER: _ClassVar[int]
    VALID_PROMPT_TOKENS_MIN_FIELD_NUMBER: _ClassVar[int]
    VALID_PROMPT_TOKENS_MAX_FIELD_NUMBER: _ClassVar[int]
    VALID_OUTPUT_TOKENS_MIN_FIELD_NUMBER: _ClassVar[int]
    VALID_OUTPUT_TOKENS_MAX_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    FIT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    id: str
    profile_id: str
    alpha_knots_p: _containers.RepeatedScalarFieldContainer[int]
    alpha_knots_seconds: _containers.RepeatedScalarFieldContainer[float]
    beta0_seconds: float
    beta1_seconds: float
    overhead_seconds: float
    request_id: str
    name: str
    kind: str
    quality: FitQuality
    intervals: _containers.MessageMap[str, Interval]
    valid_prompt_tokens_min: int
    valid_prompt_tokens_max: int
    valid_output_tokens_min: int
    valid_output_tokens_max: int
    create_time: _timestamp_pb2.Timestamp
    model_name: str
    stack: _common_pb2.StackSpec
    fit_options: _containers.ScalarMap[str, str]
    namespace: str
    def __init__(self, id: _Optional[str] = ..., profile_id: _Optional[str] = ..., alpha_knots_p: _Optional[_Iterable[int]] = ..., alpha_knots_seconds: _Optional[_Iterable[float]] = ..., beta0_seconds: _Optional[float] = ..., beta1_seconds: _Optional[float] = ..., overhead_seconds: _Optional[float] = ..., request_id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., quality: _Optional[_Union[FitQuality, _Mapping]] = ..., intervals: _Optional[_Mapping[str, Interval]] = ..., valid_prompt_tokens_min: _Optional[int] = ..., valid_prompt_tokens_max: _Optional[int] = ..., valid_output_tokens_min: _Optional[int] = ..., valid_output_tokens_max: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_name: _Optional[str] = ..., stack: _Optional[_Union[_common_pb2.StackSpec, _Mapping]] = ..., fit_options: _Optional[_Mapping[str, str]] = ..., namespace: _Optional[str] = ...) -> None: ...
