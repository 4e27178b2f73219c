"""One frozen config dataclass per service, built from IDEALRT_* environment variables and
overridden by flags in `__main__`. Passed down explicitly; no module-level mutable state."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from idealrt.core.auth import AuthConfig
from idealrt.core.tls import TlsConfig, insecure_from_env

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_PORTS",
    "KubernetesConfig",
    "MetricsConfig",
    "ProfilerConfig",
    "ServingConfig",
    "StoreConfig",
    "default_store_url",
    "standalone_env",
]

DEFAULT_DATA_DIR = Path(".idealrt")
# each service's well-known port when it runs on its own (`idealrt serve`, k8s manifests)
DEFAULT_PORTS = {"store": 50051, "serving": 50052, "profiler": 50053, "metrics": 50054}


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _int(e: Mapping[str, str], name: str, default: int, lo: int = 1) -> int:
    """An integer setting >= lo from the environment; ValueError naming the variable."""
    raw = e.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


SERVER_MODELS = ("sync", "aio")
SERVER_MODEL_VAR = "IDEALRT_SERVER_MODEL"


def _server_model(e: Mapping[str, str], default: str) -> str:
    """The gRPC server model (IDEALRT_SERVER_MODEL): "sync" (grpc.server, a thread pool)
    or "aio" (grpc.aio on an event loop thread); see idealrt.core.grpc_server."""
    raw = e.get(SERVER_MODEL_VAR, "") or default
    if raw not in SERVER_MODELS:
        raise ValueError(
            f"{SERVER_MODEL_VAR} must be one of {', '.join(SERVER_MODELS)}, got {raw!r}"
        )
    return raw


PROFILER_EXECUTORS = ("local", "kubernetes")


def _executor(e: Mapping[str, str]) -> str:
    """IDEALRT_PROFILER_EXECUTOR: "local" (default) or "kubernetes"."""
    raw = e.get("IDEALRT_PROFILER_EXECUTOR", "") or "local"
    if raw not in PROFILER_EXECUTORS:
        raise ValueError(
            f"IDEALRT_PROFILER_EXECUTOR must be one of {', '.join(PROFILER_EXECUTORS)}, got {raw!r}"
        )
    return raw


def _float(e: Mapping[str, str], name: str, default: float, lo: float = 0.0) -> float:
    """A finite number >= lo from the environment; ValueError naming the variable."""
    raw = e.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not (value >= lo and value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {value}")
    return value


def default_store_url(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    return f"sqlite:///{(data_dir / 'idealrt.sqlite').resolve()}"


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    address: str = "127.0.0.1:0"
    # the largest request or response message, bytes (IDEALRT_MAX_MESSAGE_BYTES); grpc
    # refuses a larger one with RESOURCE_EXHAUSTED before any handler runs
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # the gRPC server model (IDEALRT_SERVER_MODEL, "sync" or "aio"): see
    # idealrt.core.grpc_server and bench/bench_service.py for why each default
    server_model: str = "sync"
    log_level: str = "info"
    metrics_port: int = 0  # Prometheus; 0 = disabled
    # limits of what one request may ask for (IDEALRT_MAX_THREADS: 0 = the cores this
    # process may run on)
    max_threads: int = 0
    max_prompt_tokens: int = 1 << 20
    # Generate calls that may wait per model for its device (IDEALRT_MAX_QUEUED_GENERATIONS;
    # one more is RESOURCE_EXHAUSTED GENERATION_QUEUE_FULL)
    max_queued_generations: int = 16

    # transport security (IDEALRT_TLS_*, IDEALRT_HEALTH_PORT; idealrt.core.tls): default
    # plaintext, which start_server allows on loopback only unless allow_insecure
    # (IDEALRT_INSECURE=1)
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    allow_insecure: bool = False
    # who may call (IDEALRT_AUTH_*, idealrt.core.auth): off by default, every caller is
    # then ANONYMOUS_ADMIN; service_token_file (IDEALRT_SERVICE_TOKEN_FILE) is the token
    # this service presents to the ones it calls
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingConfig:
        e = _env(env)
        return cls(
            address=e.get("IDEALRT_SERVING_ADDRESS", cls.address),
            log_level=e.get("IDEALRT_LOG_LEVEL", cls.log_level),
            metrics_port=int(e.get("IDEALRT_METRICS_PORT", "0")),
            max_threads=_int(e, "IDEALRT_MAX_THREADS", cls.max_threads, lo=0),
            max_prompt_tokens=_int(e, "IDEALRT_MAX_PROMPT_TOKENS", cls.max_prompt_tokens),
            max_queued_generations=_int(
                e, "IDEALRT_MAX_QUEUED_GENERATIONS", cls.max_queued_generations
            ),
            tls=TlsConfig.from_env(e),
            max_message_bytes=_int(
                e, "IDEALRT_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, lo=4096
            ),
            allow_insecure=insecure_from_env(e),
            server_model=_server_model(e, cls.server_model),
            auth=AuthConfig.from_env(e),
        )


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    address: str = "127.0.0.1:0"
    # the largest request or response message, bytes (IDEALRT_MAX_MESSAGE_BYTES); grpc
    # refuses a larger one with RESOURCE_EXHAUSTED before any handler runs
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # the gRPC server model (IDEALRT_SERVER_MODEL, "sync" or "aio"): see
    # idealrt.core.grpc_server and bench/bench_service.py for why each default
    server_model: str = "sync"
    store_url: str = ""  # "" -> sqlite under data_dir
    # the largest page of a list (IDEALRT_MAX_PAGE_SIZE: profiles, cost models;
    # IDEALRT_MAX_SAMPLE_PAGE_SIZE: samples); a larger page_size is coerced to it
    max_page_size: int = 1000
    max_sample_page_size: int = 10_000
    # the database connection pool of a PostgreSQL store or an SQLite file
    # (IDEALRT_STORE_POOL_SIZE, IDEALRT_STORE_MAX_OVERFLOW, IDEALRT_STORE_POOL_TIMEOUT_S):
    # connections kept open, more opened under a burst, and how long a call waits for a free
    # one before UNAVAILABLE STORE_POOL_EXHAUSTED. 16 = the sync server's worker threads
    # (grpc_server.UNARY_WORKERS), each holding at most one connection at a time; see
    # idealrt.services.store.url.PoolLimits
    pool_size: int = 16
    max_overflow: int = 8
    pool_timeout_s: float = 10.0
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "info"
    metrics_port: int = 0

    # transport security: as ServingConfig.tls / allow_insecure
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    allow_insecure: bool = False
    # authentication: as ServingConfig.auth
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)

    @property
    def resolved_url(self) -> str:
        return self.store_url or default_store_url(self.data_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreConfig:
        e = _env(env)
        return cls(
            address=e.get("IDEALRT_STORE_ADDRESS", cls.address),
            store_url=e.get("IDEALRT_STORE_URL", ""),
            max_page_size=_int(e, "IDEALRT_MAX_PAGE_SIZE", cls.max_page_size),
            max_sample_page_size=_int(e, "IDEALRT_MAX_SAMPLE_PAGE_SIZE", cls.max_sample_page_size),
            pool_size=_int(e, "IDEALRT_STORE_POOL_SIZE", cls.pool_size),
            max_overflow=_int(e, "IDEALRT_STORE_MAX_OVERFLOW", cls.max_overflow, lo=0),
            pool_timeout_s=_float(e, "IDEALRT_STORE_POOL_TIMEOUT_S", cls.pool_timeout_s, lo=0.001),
            data_dir=Path(e.get("IDEALRT_DATA_DIR", str(DEFAULT_DATA_DIR))),
            log_level=e.get("IDEALRT_LOG_LEVEL", cls.log_level),
            metrics_port=int(e.get("IDEALRT_METRICS_PORT", "0")),
            tls=TlsConfig.from_env(e),
            max_message_bytes=_int(
                e, "IDEALRT_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, lo=4096
            ),
            allow_insecure=insecure_from_env(e),
            server_model=_server_model(e, cls.server_model),
            auth=AuthConfig.from_env(e),
        )


_SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _labels(e: Mapping[str, str], name: str, default: str) -> tuple[tuple[str, str], ...]:
    """`k=v[,k=v]` node labels from the environment; ValueError naming the variable."""
    raw = e.get(name, default)
    out = []
    for term in filter(None, (t.strip() for t in raw.split(","))):
        key, eq, value = term.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{name} must be label=value[,label=value], got {raw!r}")
        out.append((key.strip(), value.strip()))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class KubernetesConfig:
    """The kubernetes executor's settings (IDEALRT_PROFILER_EXECUTOR=kubernetes), from
    IDEALRT_K8S_* (k8s/overlays/gpu sets them; see k8s/README.md)."""

    namespace: str = "idealrt"  # where Jobs and Leases live (default: the pod's own)
    identity: str = ""  # this replica, the Lease holder (default: the host name)
    image: str = "idealrt:latest"  # the image of the profiling Jobs
    store: str = "idealrt-store:50051"  # the store as a Job's pod reaches it
    metrics: str = "idealrt-metrics:50054"
    nodes: tuple[str, ...] = ()  # a fixed list of GPU nodes; empty: by node_selector
    node_selector: tuple[tuple[str, str], ...] = (("nvidia.com/gpu.present", "true"),)
    node_pool_label: str = "idealrt.io/node-pool"
    gpu_resource: str = "nvidia.com/gpu"
    gpus: int = 1  # GPUs per profile (a whole-node profile takes every allocatable one)
    cpu: str = "4"  # the serving container's CPU and memory (Guaranteed QoS)
    memory: str = "16Gi"
    max_profiles: int = 256  # profiles this profiler follows at once (queued or running)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubernetesConfig:
        e = _env(env)
        namespace = e.get("IDEALRT_K8S_NAMESPACE", "")
        if not namespace and _SA_NAMESPACE_FILE.is_file():
            namespace = _SA_NAMESPACE_FILE.read_text().strip()
        return cls(
            namespace=namespace or cls.namespace,
            identity=e.get("IDEALRT_K8S_IDENTITY", ""),
            image=e.get("IDEALRT_K8S_IMAGE", cls.image),
            store=e.get("IDEALRT_K8S_STORE", cls.store),
            metrics=e.get("IDEALRT_K8S_METRICS", cls.metrics),
            nodes=tuple(
                filter(None, (n.strip() for n in e.get("IDEALRT_K8S_NODES", "").split(",")))
            ),
            node_selector=_labels(e, "IDEALRT_K8S_NODE_SELECTOR", "nvidia.com/gpu.present=true"),
            node_pool_label=e.get("IDEALRT_K8S_NODE_POOL_LABEL", cls.node_pool_label),
            gpu_resource=e.get("IDEALRT_K8S_GPU_RESOURCE", cls.gpu_resource),
            gpus=_int(e, "IDEALRT_K8S_GPUS", cls.gpus),
            cpu=e.get("IDEALRT_K8S_CPU", cls.cpu),
            memory=e.get("IDEALRT_K8S_MEMORY", cls.memory),
            max_profiles=_int(e, "IDEALRT_K8S_MAX_PROFILES", cls.max_profiles),
        )


@dataclasses.dataclass(frozen=True)
class ProfilerConfig:
    address: str = "127.0.0.1:0"
    # the largest request or response message, bytes (IDEALRT_MAX_MESSAGE_BYTES); grpc
    # refuses a larger one with RESOURCE_EXHAUSTED before any handler runs
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    store_target: str = ""  # host:port of the store service
    serving_target: str = ""  # default serving endpoint for profiles without an address
    data_dir: Path = DEFAULT_DATA_DIR  # leases live under data_dir/leases
    log_level: str = "info"
    metrics_port: int = 0
    resume: bool = True  # resume unfinished profiles at start-up
    # limits: samples one plan may ask for; WatchProfile streams open at once (beyond:
    # RESOURCE_EXHAUSTED). A watch on the profiler's grpc.aio server is a coroutine, not a
    # thread (~tens of KiB with its HTTP/2 stream): the bound is for memory, sized for a
    # dashboard's fleet of watchers
    max_plan_samples: int = 200_000
    # the largest prompt or output length (tokens) a plan may ask for
    max_plan_tokens: int = 1 << 20
    max_watch_streams: int = 4096
    # how long a profile rides out an unreachable store or serving (retries with
    # exponential backoff and jitter) before it ends FAILED
    outage_window_s: float = 300.0
    # judge samples by other processes' CPU time on the measured cores (and GPU processes);
    # off only where that is expected and unrelated (a test suite on a shared machine): the
    # rules on the samples' own times still apply
    contention_monitors: bool = True
    # judge samples for contention at all (IDEALRT_CONTENTION_CHECKS=0: every sample is
    # accepted as measured; for test suites whose subject is not contention, on a shared
    # machine where other load would make their profiles INVALID at random)
    contention_checks: bool = True
    # how long contention may last before a profile ends INVALID instead of waiting it out
    # (IDEALRT_CONTENTION_PATIENCE_S; services/profiler/contention.py ContentionPolicy)
    contention_patience_s: float = 120.0
    # store writes (sample batches, progress) on threads of their own, so that a slow
    # store does not pause the run (IDEALRT_BACKGROUND_WRITES=0: between samples, on the
    # measuring thread; the embedded suite does that, as there the store and the serving
    # being measured share the profiler's process, its CPU and its GIL)
    background_writes: bool = True
    # outbound HTTP targets (IDEALRT_OUTBOUND_CONFIG, a TOML file): the named API
    # credentials and the hosts each namespace may reach (services/profiler/outbound.py);
    # None: no credentials and no hosts (the embedded suite, on loopback, allows loopback)
    outbound_config: Path | None = None
    # per-namespace quotas (IDEALRT_QUOTAS_FILE, TOML: services/profiler/quotas.py);
    # None: no limits
    quotas_file: Path | None = None
    # where profiles run (IDEALRT_PROFILER_EXECUTOR): "local" (this process, the default)
    # or "kubernetes" (one Job per profile on a leased GPU node:
    # idealrt.services.profiler.executor.kubernetes)
    executor: str = "local"
    kubernetes: KubernetesConfig = dataclasses.field(default_factory=KubernetesConfig)
    # inside a profiling Job's pod (IDEALRT_PROFILER_RUN, set by the kubernetes executor):
    # run this one stored profile by id at start-up (instead of resuming others)
    run_profile: str = ""

    # transport security: as ServingConfig.tls / allow_insecure
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    allow_insecure: bool = False
    # authentication: as ServingConfig.auth
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)

    @property
    def lease_dir(self) -> Path:
        return self.data_dir / "leases"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProfilerConfig:
        e = _env(env)
        return cls(
            address=e.get("IDEALRT_PROFILER_ADDRESS", cls.address),
            store_target=e.get("IDEALRT_STORE_TARGET", ""),
            serving_target=e.get("IDEALRT_SERVING_TARGET", ""),
            data_dir=Path(e.get("IDEALRT_DATA_DIR", str(DEFAULT_DATA_DIR))),
            log_level=e.get("IDEALRT_LOG_LEVEL", cls.log_level),
            metrics_port=int(e.get("IDEALRT_METRICS_PORT", "0")),
            resume=e.get("IDEALRT_RESUME", "1") != "0",
            max_plan_samples=_int(e, "IDEALRT_MAX_PLAN_SAMPLES", cls.max_plan_samples),
            max_plan_tokens=_int(e, "IDEALRT_MAX_PLAN_TOKENS", cls.max_plan_tokens),
            max_watch_streams=_int(e, "IDEALRT_MAX_WATCH_STREAMS", cls.max_watch_streams),
            outage_window_s=_float(e, "IDEALRT_OUTAGE_WINDOW_S", cls.outage_window_s),
            contention_monitors=e.get("IDEALRT_CONTENTION_MONITORS", "1") != "0",
            contention_checks=e.get("IDEALRT_CONTENTION_CHECKS", "1") != "0",
            contention_patience_s=_float(
                e, "IDEALRT_CONTENTION_PATIENCE_S", cls.contention_patience_s, lo=1.0
            ),
            background_writes=e.get("IDEALRT_BACKGROUND_WRITES", "1") != "0",
            outbound_config=Path(e["IDEALRT_OUTBOUND_CONFIG"])
            if e.get("IDEALRT_OUTBOUND_CONFIG")
            else None,
            quotas_file=Path(e["IDEALRT_QUOTAS_FILE"]) if e.get("IDEALRT_QUOTAS_FILE") else None,
            executor=_executor(e),
            kubernetes=KubernetesConfig.from_env(e),
            run_profile=e.get("IDEALRT_PROFILER_RUN", ""),
            tls=TlsConfig.from_env(e),
            max_message_bytes=_int(
                e, "IDEALRT_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, lo=4096
            ),
            allow_insecure=insecure_from_env(e),
            auth=AuthConfig.from_env(e),
        )


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    address: str = "127.0.0.1:0"
    # the largest request or response message, bytes (IDEALRT_MAX_MESSAGE_BYTES); grpc
    # refuses a larger one with RESOURCE_EXHAUSTED before any handler runs
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # the gRPC server model (IDEALRT_SERVER_MODEL, "sync" or "aio"): see
    # idealrt.core.grpc_server and bench/bench_service.py for why each default
    server_model: str = "sync"
    store_target: str = ""
    log_level: str = "info"
    metrics_port: int = 0
    # limits of one request: queries in a unary call (StreamEstimateRuntime has none), and
    # the size and nesting depth of JSON documents (ImportHelm)
    max_queries_per_call: int = 2_000_000
    max_json_bytes: int = 16 << 20
    max_json_depth: int = 32

    # transport security: as ServingConfig.tls / allow_insecure
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    allow_insecure: bool = False
    # authentication: as ServingConfig.auth
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MetricsConfig:
        e = _env(env)
        return cls(
            address=e.get("IDEALRT_METRICS_ADDRESS", cls.address),
            store_target=e.get("IDEALRT_STORE_TARGET", ""),
            log_level=e.get("IDEALRT_LOG_LEVEL", cls.log_level),
            metrics_port=int(e.get("IDEALRT_METRICS_PORT", "0")),
            max_queries_per_call=_int(e, "IDEALRT_MAX_QUERIES_PER_CALL", cls.max_queries_per_call),
            max_json_bytes=_int(e, "IDEALRT_MAX_JSON_BYTES", cls.max_json_bytes),
            max_json_depth=_int(e, "IDEALRT_MAX_JSON_DEPTH", cls.max_json_depth),
            tls=TlsConfig.from_env(e),
            max_message_bytes=_int(
                e, "IDEALRT_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, lo=4096
            ),
            allow_insecure=insecure_from_env(e),
            server_model=_server_model(e, cls.server_model),
            auth=AuthConfig.from_env(e),
        )


_FLAG_VARS = {
    "store_target": "IDEALRT_STORE_TARGET",
    "serving_target": "IDEALRT_SERVING_TARGET",
    "store_url": "IDEALRT_STORE_URL",
    "data_dir": "IDEALRT_DATA_DIR",
}


def standalone_env(
    service: str, flags: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a service run on its own builds its config from: the process's
    (or `env`), its address defaulting to loopback on its well-known port (as `idealrt up`
    binds; a deployment names its address, e.g. the k8s ConfigMap's 0.0.0.0), and the
    non-empty `flags` (address, store_target, serving_target, store_url, data_dir) over
    both."""
    out = dict(_env(env))
    key = f"IDEALRT_{service.upper()}_ADDRESS"
    out.setdefault(key, f"127.0.0.1:{DEFAULT_PORTS[service]}")
    for name, value in (flags or {}).items():
        if name not in _FLAG_VARS and name != "address":
            raise ValueError(f"unknown flag {name!r} of a standalone service")
        if value:
            out[key if name == "address" else _FLAG_VARS[name]] = value
    return out
