"""Plain dataclasses shared by every service: the domain, free of gRPC and protobuf.

Times of measurements are integer nanoseconds (`*_ns`); wall-clock instants are
`datetime` in UTC. Converters to and from protobuf live in `idealrt.core.convert`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from datetime import datetime

from idealrt.core.model_spec import ModelSpec

# Every stored object (profile, its samples, cost model) belongs to one namespace, a DNS
# label (`idealrt.core.namespaces` checks it); objects created without one live here.
DEFAULT_NAMESPACE = "default"

__all__ = [
    "DEFAULT_NAMESPACE",
    "Backend",
    "ContentionColumns",
    "ContentionObservation",
    "CostModel",
    "FitQuality",
    "LeasePolicy",
    "ModelRef",
    "Placement",
    "Profile",
    "ProfilePlan",
    "ProfileState",
    "Provenance",
    "Sample",
    "SampleBatch",
    "SampleFlag",
    "SampleTiming",
    "StackSpec",
    "Target",
    "TargetKind",
]


class Backend(enum.StrEnum):
    PYTORCH = "pytorch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TRANSFORMERS = "transformers"


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """The software/hardware stack a model runs on. `options` are backend specific
    (e.g. {"cuda_graphs": "1", "torch_compile": "0", "threads": "2"}) and are recorded."""

    backend: Backend = Backend.PYTORCH
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model: either a catalog name, or an explicit spec. Weights: seeded random init
    unless `weights_path` names a local safetensors file / Hugging Face directory."""

    name: str = ""
    spec: ModelSpec | None = None
    seed: int = 0
    weights_path: str = ""


class LeasePolicy(enum.StrEnum):
    WAIT = "wait"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True)
class ProfilePlan:
    """What to measure. The fit grid is prompt_tokens x output_tokens; the held-out grid
    (holdout_prompt_tokens x holdout_output_tokens, each defaulting to the fit grid's other
    axis when empty) is measured in the same run but never used to fit."""

    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    repeats: int = 3
    warmups: int = 1
    holdout_prompt_tokens: tuple[int, ...] = ()
    holdout_output_tokens: tuple[int, ...] = ()
    seed: int = 0
    randomize: bool = True
    until_ci_rel: float = 0.0  # >0: repeat until CI half-width / mean < this (e.g. 0.01)
    max_repeats: int = 0  # cap for until_ci_rel (0: 10 x repeats)
    budget_s: float = 0.0  # 0: unlimited
    lease: LeasePolicy = LeasePolicy.WAIT
    batch_size: int = 1
    # Adaptive planning: > 0 adds prompt sizes between the grid's where the fitted alpha is
    # most uncertain until every candidate's 95% CI half-width / value is below this.
    adaptive_target_rel: float = 0.0
    adaptive_max_prompt_sizes: int = 0  # cap on added sizes (0: 8)
    # Spread each round's start over this many seconds (black-box APIs: contention varies).
    spread_s: float = 0.0


class TargetKind(enum.StrEnum):
    SERVING = "serving"  # an idealrt serving endpoint (gRPC)
    HTTP = "http"  # a black-box OpenAI-compatible completions API


@dataclasses.dataclass(frozen=True)
class Target:
    kind: TargetKind = TargetKind.SERVING
    address: str = ""  # serving: host:port ("" = the profiler's configured serving)
    base_url: str = ""  # http
    api_model: str = ""  # http: model name sent to the API
    # http: id of an API credential the profiler's operator configured (outbound.py: its
    # namespaces and the base URLs it may be sent to); never a key, nor a variable's name
    credential: str = ""
    tokenizer: str = ""  # http: local tokenizer path used to build exact-length prompts
    # http: stream ("1"/"0"), prompt_format ("text"/"token_ids"), eos_dialects ("vllm,none"),
    # connect_timeout_s, read_timeout_s
    options: dict[str, str] = dataclasses.field(default_factory=dict)


class ProfileState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # finished, but never an idealized result: contention persisted (CONTENTION), or the
    # samples cannot identify the cost model (TIMING_EVIDENCE_INSUFFICIENT)
    INVALID = "invalid"

    @property
    def terminal(self) -> bool:
        return self in (
            ProfileState.SUCCEEDED,
            ProfileState.FAILED,
            ProfileState.CANCELLED,
            ProfileState.INVALID,
        )


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Environment fingerprint: flat key -> value (e.g. "cpu.model", "torch.version",
    "gpu.0.name", "idealrt.git_rev", "model.spec_hash")."""

    entries: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a profile may run when the profiler's executor is "kubernetes" (the local
    executor refuses a non-empty one). Empty fields: any."""

    gpu_product: str = ""  # node label nvidia.com/gpu.product, e.g. "NVIDIA-H100-80GB-HBM3"
    node_pool: str = ""  # value of the profiler's node-pool label (IDEALRT_K8S_NODE_POOL_LABEL)
    whole_node: bool = False  # every GPU of the node (its allocatable count), not the configured

    @property
    def empty(self) -> bool:
        return not (self.gpu_product or self.node_pool or self.whole_node)


@dataclasses.dataclass
class Profile:
    id: str
    model: ModelRef
    stack: StackSpec
    plan: ProfilePlan
    target: Target = dataclasses.field(default_factory=Target)
    state: ProfileState = ProfileState.QUEUED
    request_id: str = ""
    create_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    completed_samples: int = 0
    total_samples: int = 0
    error: str = ""
    provenance: Provenance = dataclasses.field(default_factory=Provenance)
    model_spec: ModelSpec | None = None  # resolved spec actually measured
    # set at creation, never changed: its samples and cost models belong to it too
    namespace: str = DEFAULT_NAMESPACE
    placement: Placement = dataclasses.field(default_factory=Placement)
    # 1-based position in the profiler's queue while QUEUED, 0 otherwise; set by the
    # profiler, read-only for clients (CreateProfile ignores a client's value)
    queue_position: int = 0


class SampleFlag(enum.StrEnum):
    OK = "ok"
    WARMUP = "warmup"
    CONTENDED = "contended"  # outside the robust baseline; re-measured
    NONCONFORMING = "nonconforming"  # token counts differ from the plan


class SampleTiming(enum.StrEnum):
    """How a sample's times were obtained: what its prefill_ns and decode_ns can be
    trusted for. prefill_ns = 0 always means "unknown" (never a measured 0 ns), and
    decode_ns is empty whenever per-step times are unknown: nothing is invented.

    Samples stored before the field existed read as SERVER_STEPS (what the Sample
    contract promised then), except those whose times show otherwise (no prefill, or no
    decode steps for o >= 2), which the store's migration 3 marked TOTALS_ONLY."""

    # the serving service timed prefill and every decode step in-process
    SERVER_STEPS = "server_steps"
    # a stream of one chunk per token: prefill = first chunk's arrival, steps = the gaps
    STREAM_TOKENS = "stream_tokens"
    # a stream whose chunks carry several (or varying) tokens: per-step times unknown;
    # prefill_ns only when the first chunk carried exactly the first token, else 0
    STREAM_CHUNKS = "stream_chunks"
    # only the request's total (e.g. a non-streamed response); prefill_ns = 0
    TOTALS_ONLY = "totals_only"

    @property
    def has_steps(self) -> bool:
        """Whether samples of this timing carry per-step decode times."""
        return self in (SampleTiming.SERVER_STEPS, SampleTiming.STREAM_TOKENS)


@dataclasses.dataclass(frozen=True)
class ContentionObservation:
    """Observations taken around (never inside) a timed region."""

    foreign_cpu_s: float = 0.0  # other processes' CPU time on our cores during the sample
    gpu_foreign_processes: int = 0
    sm_clock_mhz: float = 0.0
    temperature_c: float = 0.0
    throttle_reasons: int = 0
    energy_j: float = 0.0  # device/package energy over the sample, if readable
    energy_source: str = ""  # "nvml" | "rapl" | ""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One exact-length generation, timed inside the serving process.

    prefill_ns: request start -> first output token (alpha).
    decode_ns[i]: end of token i+1 -> end of token i+2 (o-1 entries).
    total_ns: prefill + all decode steps (server-side, excludes RPC).
    """

    prompt_tokens: int
    output_tokens: int
    prefill_ns: int
    decode_ns: tuple[int, ...]
    total_ns: int
    batch_size: int = 1
    start_time: datetime | None = None
    rpc_ns: int = 0  # client-observed round trip, reported separately
    heldout: bool = False
    repeat: int = 0
    flag: SampleFlag = SampleFlag.OK
    contention: ContentionObservation = dataclasses.field(default_factory=ContentionObservation)
    # how the times were obtained (see SampleTiming); the default is what every sample
    # meant before the field existed: timed in the serving process
    timing: SampleTiming = SampleTiming.SERVER_STEPS
    chunks: int = 0  # stream chunks that carried text (0 when not streamed)
    seq: int = -1  # position within the profile (set by the store)

    @property
    def measured_prefill_ns(self) -> int:
        """prefill_ns where it is a measured time, else 0 ("unknown"): a TOTALS_ONLY
        sample's is never one (a row stored before timing was recorded may hold a value)."""
        return 0 if self.timing is SampleTiming.TOTALS_ONLY else self.prefill_ns

    @property
    def measured_decode_ns(self) -> tuple[int, ...]:
        """decode_ns where its timing has per-step times, else ()."""
        return self.decode_ns if self.timing.has_steps else ()


@dataclasses.dataclass(frozen=True, eq=False)
class ContentionColumns:
    """The ContentionObservation fields of a SampleBatch, one sequence per field."""

    foreign_cpu_s: Sequence[float]
    gpu_foreign_processes: Sequence[int]
    sm_clock_mhz: Sequence[float]
    temperature_c: Sequence[float]
    throttle_reasons: Sequence[int]
    energy_j: Sequence[float]
    energy_source: Sequence[str]


@dataclasses.dataclass(frozen=True, eq=False)
class SampleBatch:
    """Samples by column: the bulk form of a sequence of `Sample` (what one append of a
    profile's samples carries), sample k's field f at `getattr(batch, f)[k]` (contention's
    at `getattr(batch.contention, f)[k]`), every sequence of one length. Ingest builds it
    straight from protobuf, without a Sample object per sample; `samples()` gives the
    Samples it holds (seq -1: the store assigns seqs), `from_samples` the batch of a list.
    Read-only once built, whatever the sequences' types (lists, tuples, arrays)."""

    prompt_tokens: Sequence[int]
    output_tokens: Sequence[int]
    prefill_ns: Sequence[int]
    decode_ns: Sequence[Sequence[int]]
    total_ns: Sequence[int]
    batch_size: Sequence[int]
    start_time: Sequence[datetime | None]
    rpc_ns: Sequence[int]
    heldout: Sequence[bool]
    repeat: Sequence[int]
    flag: Sequence[SampleFlag]
    contention: ContentionColumns
    timing: Sequence[SampleTiming]
    chunks: Sequence[int]

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> SampleBatch:
        def column(name: str, rows: Sequence[object]) -> tuple[object, ...]:
            return tuple(getattr(r, name) for r in rows)

        contention = [s.contention for s in samples]
        return cls(
            **{f.name: column(f.name, samples) for f in _BATCH_FIELDS},  # type: ignore[arg-type]
            contention=ContentionColumns(
                **{f.name: column(f.name, contention) for f in _CONTENTION_FIELDS}  # type: ignore[arg-type]
            ),
        )

    def samples(self) -> list[Sample]:
        """The batch as Samples (decode steps as tuples), seq -1; columns of different
        lengths are a ValueError."""
        c = self.contention
        observations = [
            ContentionObservation(*fields)
            for fields in zip(
                c.foreign_cpu_s, c.gpu_foreign_processes, c.sm_clock_mhz, c.temperature_c,
                c.throttle_reasons, c.energy_j, c.energy_source, strict=True,
            )
        ]  # fmt: skip
        return [
            Sample(
                prompt_tokens=p,
                output_tokens=o,
                prefill_ns=pre,
                decode_ns=tuple(dec),
                total_ns=tot,
                batch_size=b,
                start_time=t,
                rpc_ns=rpc,
                heldout=h,
                repeat=r,
                flag=f,
                contention=obs,
                timing=tm,
                chunks=ch,
            )
            for p, o, pre, dec, tot, b, t, rpc, h, r, f, obs, tm, ch in zip(
                self.prompt_tokens, self.output_tokens, self.prefill_ns, self.decode_ns,
                self.total_ns, self.batch_size, self.start_time, self.rpc_ns, self.heldout,
                self.repeat, self.flag, observations, self.timing, self.chunks, strict=True,
            )
        ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FitQuality:
    """Relative errors |pred - meas| / meas over the evaluation points."""

    method: str = "heldout"  # "heldout" | "kfold" | "none"
    points: int = 0
    mean_rel: float = 0.0
    p95_rel: float = 0.0
    max_rel: float = 0.0


@dataclasses.dataclass
class CostModel:
    """runtime(p, o) = overhead + alpha(p) + sum_{i=1}^{o-1} beta(p + i), seconds.

    alpha is piecewise linear and monotone through (alpha_knots_p, alpha_knots_s); beyond the
    last knot it continues with the tail slope; below the first knot it is flat.
    beta(c) = beta0_s + beta1_s * c.
    """

    id: str
    profile_id: str
    alpha_knots_p: tuple[int, ...]
    alpha_knots_s: tuple[float, ...]
    beta0_s: float
    beta1_s: float = 0.0
    overhead_s: float = 0.0
    request_id: str = ""
    name: str = ""
    kind: str = "idealized"  # "idealized" | "denoised" | "imported"
    quality: FitQuality = dataclasses.field(default_factory=FitQuality)
    # bootstrap confidence intervals (95%): name -> (low, high); names "beta0", "beta1",
    # "overhead", "alpha@<p>"
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    valid_prompt_tokens: tuple[int, int] = (0, 0)
    valid_output_tokens: tuple[int, int] = (0, 0)
    create_time: datetime | None = None
    model_name: str = ""
    stack: StackSpec | None = None
    # the FitOptions of the fit (name -> value as text), to re-derive its bootstrap
    # replicates exactly; empty where not fitted here or stored before this field existed
    fit_options: dict[str, str] = dataclasses.field(default_factory=dict)
    # set at creation, never changed; equal to its profile's when profile_id names one
    namespace: str = DEFAULT_NAMESPACE


# SampleBatch's columns that are Sample fields of the same name (contention aside: its own)
_BATCH_FIELDS = tuple(f for f in dataclasses.fields(SampleBatch) if f.name != "contention")
_CONTENTION_FIELDS = dataclasses.fields(ContentionObservation)
