import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Norm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORM_UNSPECIFIED: _ClassVar[Norm]
    NORM_LAYERNORM: _ClassVar[Norm]
    NORM_RMSNORM: _ClassVar[Norm]

class Activation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_UNSPECIFIED: _ClassVar[Activation]
    ACTIVATION_GELU: _ClassVar[Activation]
    ACTIVATION_GELU_EXACT: _ClassVar[Activation]
    ACTIVATION_RELU: _ClassVar[Activation]
    ACTIVATION_SWIGLU: _ClassVar[Activation]

class Positional(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITIONAL_UNSPECIFIED: _ClassVar[Positional]
    POSITIONAL_LEARNED: _ClassVar[Positional]
    POSITIONAL_LEARNED_OFFSET: _ClassVar[Positional]
    POSITIONAL_ROTARY: _ClassVar[Positional]
    POSITIONAL_ALIBI: _ClassVar[Positional]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_PYTORCH: _ClassVar[Backend]
    BACKEND_ONNXRUNTIME: _ClassVar[Backend]
    BACKEND_TENSORRT: _ClassVar[Backend]
    BACKEND_TRANSFORMERS: _ClassVar[Backend]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    D_TYPE_UNSPECIFIED: _ClassVar[DType]
    D_TYPE_FP32: _ClassVar[DType]
    D_TYPE_FP16: _ClassVar[DType]
    D_TYPE_BF16: _ClassVar[DType]

class SampleFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_FLAG_UNSPECIFIED: _ClassVar[SampleFlag]
    SAMPLE_FLAG_OK: _ClassVar[SampleFlag]
    SAMPLE_FLAG_WARMUP: _ClassVar[SampleFlag]
    SAMPLE_FLAG_CONTENDED: _ClassVar[SampleFlag]
    SAMPLE_FLAG_NONCONFORMING: _ClassVar[SampleFlag]

class SampleTiming(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_TIMING_UNSPECIFIED: _ClassVar[SampleTiming]
    SAMPLE_TIMING_SERVER_STEPS: _ClassVar[SampleTiming]
    SAMPLE_TIMING_STREAM_TOKENS: _ClassVar[SampleTiming]
    SAMPLE_TIMING_STREAM_CHUNKS: _ClassVar[SampleTiming]
    SAMPLE_TIMING_TOTALS_ONLY: _ClassVar[SampleTiming]
NORM_UNSPECIFIED: Norm
NORM_LAYERNORM: Norm
NORM_RMSNORM: Norm
ACTIVATION_UNSPECIFIED: Activation
ACTIVATION_GELU: Activation
ACTIVATION_GELU_EXACT: Activation
ACTIVATION_RELU: Activation
ACTIVATION_SWIGLU: Activation
POSITIONAL_UNSPECIFIED: Positional
POSITIONAL_LEARNED: Positional
POSITIONAL_LEARNED_OFFSET: Positional
POSITIONAL_ROTARY: Positional
POSITIONAL_ALIBI: Positional
BACKEND_UNSPECIFIED: Backend
BACKEND_PYTORCH: Backend
BACKEND_ONNXRUNTIME: Backend
BACKEND_TENSORRT: Backend
BACKEND_TRANSFORMERS: Backend
D_TYPE_UNSPECIFIED: DType
D_TYPE_FP32: DType
D_TYPE_FP16: DType
D_TYPE_BF16: DType
SAMPLE_FLAG_UNSPECIFIED: SampleFlag
SAMPLE_FLAG_OK: SampleFlag
SAMPLE_FLAG_WARMUP: SampleFlag
SAMPLE_FLAG_CONTENDED: SampleFlag
SAMPLE_FLAG_NONCONFORMING: SampleFlag
SAMPLE_TIMING_UNSPECIFIED: SampleTiming
SAMPLE_TIMING_SERVER_STEPS: SampleTiming
SAMPLE_TIMING_STREAM_TOKENS: SampleTiming
SAMPLE_TIMING_STREAM_CHUNKS: SampleTiming
SAMPLE_TIMING_TOTALS_ONLY: SampleTiming

class ModelSpec(_message.Message):
    __slots__ = ("name", "layers", "d_model", "heads", "kv_heads", "d_ff", "vocab", "max_positions", "norm", "activation", "positional", "tied_embeddings", "parallel_attention", "rotary_pct", "rotary_base", "bias", "norm_eps", "family", "attn_bias", "lm_head_bias", "embedding_norm", "shared_norm", "sliding_window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    POSITIONAL_FIELD_NUMBER: _ClassVar[int]
    TIED_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ROTARY_PCT_FIELD_NUMBER: _ClassVar[int]
    ROTARY_BASE_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    NORM_EPS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ATTN_BIAS_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_BIAS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARED_NORM_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    d_ff: int
    vocab: int
    max_positions: int
    norm: Norm
    activation: Activation
    positional: Positional
    tied_embeddings: bool
    parallel_attention: bool
    rotary_pct: float
    rotary_base: float
    bias: bool
    norm_eps: float
    family: str
    attn_bias: bool
    lm_head_bias: bool
    embedding_norm: bool
    shared_norm: bool
    sliding_window: int
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[int] = ..., d_model: _Optional[int] = ..., heads: _Optional[int] = ..., kv_heads: _Optional[int] = ..., d_ff: _Optional[int] = ..., vocab: _Optional[int] = ..., max_positions: _Optional[int] = ..., norm: _Optional[_Union[Norm, str]] = ..., activation: _Optional[_Union[Activation, str]] = ..., positional: _Optional[_Union[Positional, str]] = ..., tied_embeddings: _Optional[bool] = ..., parallel_attention: _Optional[bool] = ..., rotary_pct: _Optional[float] = ..., rotary_base: _Optional[float] = ..., bias: _Optional[bool] = ..., norm_eps: _Optional[float] = ..., family: _Optional[str] = ..., attn_bias: _Optional[bool] = ..., lm_head_bias: _Optional[bool] = ..., embedding_norm: _Optional[bool] = ..., shared_norm: _Optional[bool] = ..., sliding_window: _Optional[int] = ...) -> None: ...

class ModelFacts(_message.Message):
    __slots__ = ("param_count", "weight_bytes", "kv_cache_bytes_per_token", "spec_hash")
    PARAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    param_count: int
    weight_bytes: int
    kv_cache_bytes_per_token: int
    spec_hash: str
    def __init__(self, param_count: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes_per_token: _Optional[int] = ..., spec_hash: _Optional[str] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "spec", "seed", "weights_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: ModelSpec
    seed: int
    weights_path: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., seed: _Optional[int] = ..., weights_path: _Optional[str] = ...) -> None: ...

class StackSpec(_message.Message):
    __slots__ = ("backend", "device", "dtype", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    backend: Backend
    device: str
    dtype: DType
    options: _containers.ScalarMap[str, str]
    def __init__(self, backend: _Optional[_Union[Backend, str]] = ..., device: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ContentionObservation(_message.Message):
    __slots__ = ("foreign_cpu_seconds", "gpu_foreign_processes", "sm_clock_mhz", "temperature_c", "throttle_reasons", "energy_joules", "energy_source")
    FOREIGN_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_FOREIGN_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    foreign_cpu_seconds: float
    gpu_foreign_processes: int
    sm_clock_mhz: float
    temperature_c: float
    throttle_reasons: int
    energy_joules: float
    energy_source: str
    def __init__(self, foreign_cpu_seconds: _Optional[float] = ..., gpu_foreign_processes: _Optional[int] = ..., sm_clock_mhz: _Optional[float] = ..., temperature_c: _Optional[float] = ..., throttle_reasons: _Optional[int] = ..., energy_joules: _Optional[float] = ..., energy_source: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("prompt_tokens", "output_tokens", "batch_size", "prefill_ns", "decode_ns", "total_ns", "rpc_ns", "start_time", "heldout", "repeat", "flag", "contention", "seq", "timing", "chunks")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NS_FIELD_NUMBER: _ClassVar[int]
    DECODE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    RPC_NS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_FIELD_NUMBER: _ClassVar[int]
    REPEAT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    CONTENTION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    output_tokens: int
    batch_size: int
    prefill_ns: int
    decode_ns: _containers.RepeatedScalarFieldContainer[int]
    total_ns: int
    rpc_ns: int
    start_time: _timestamp_pb2.Timestamp
    heldout: bool
    repeat: int
    flag: SampleFlag
    contention: ContentionObservation
    seq: int
    timing: SampleTiming
    chunks: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., batch_size: _Optional[int] = ..., prefill_ns: _Optional[int] = ..., decode_ns: _Optional[_Iterable[int]] = ..., total_ns: _Optional[int] = ..., rpc_ns: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heldout: _Optional[bool] = ..., repeat: _Optional[int] = ..., flag: _Optional[_Union[SampleFlag, str]] = ..., contention: _Optional[_Union[ContentionObservation, _Mapping]] = ..., seq: _Optional[int] = ..., timing: _Optional[_Union[SampleTiming, str]] = ..., chunks: _Optional[int] = ...) -> None: ...
