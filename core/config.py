"""One frozen config dataclass per service, built from IDEALRT_* environment variables and
overridden by flags in `__main__`. Passed down explicitly; no module-level mutable state."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_PORTS",
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


def default_store_url(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    return f"sqlite:///{(data_dir / 'idealrt.sqlite').resolve()}"


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    address: str = "127.0.0.1:0"
    log_level: str = "info"
    metrics_port: int = 0  # Prometheus; 0 = disabled

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingConfig:
        e = _env(env)
        return cls(
            address=e.get("IDEALRT_SERVING_ADDRESS", cls.address),
            log_level=e.get("IDEALRT_LOG_LEVEL", cls.log_level),
            metrics_port=int(e.get("IDEALRT_METRICS_PORT", "0")),
        )


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    address: str = "127.0.0.1:0"
    store_url: str = ""  # "" -> sqlite under data_dir
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "info"
    metrics_port: int = 0

    @property
    def resolved_url(self) -> str:
        return self.store_url or default_store_url(self.data_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreConfig:
        e = _env(env)
        return cls(
            address=e.get("IDEALRT_STORE_ADDRESS", cls.address),
            store_url=e.get("IDEALRT_STORE_URL", ""),
            data_dir=Path(e.get("IDEALRT_DATA_DIR", str(DEFAULT_DATA_DIR))),
            log_level=e.get("IDEALRT_LOG_LEVEL", cls.log_level),
            metrics_port=int(e.get("IDEALRT_METRICS_PORT", "0")),
        )


@dataclasses.dataclass(frozen=True)
class ProfilerConfig:
    address: str = "127.0.0.1:0"
    store_target: str = ""  # host:port of the store service
    serving_target: str = ""  # default serving endpoint for profiles without an address
    data_dir: Path = DEFAULT_DATA_DIR  # leases live under data_dir/leases
    log_level: str = "info"
    metrics_port: int = 0
    resume: bool = True  # resume unfinished profiles at start-up

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
        )


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    address: str = "127.0.0.1:0"
    store_target: str = ""
    log_level: str = "info"
    metrics_port: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MetricsConfig:
        e = _env(env)
        return cls(
            address=e.get("IDEALRT_METRICS_ADDRESS", cls.address),
            store_target=e.get("IDEALRT_STORE_TARGET", ""),
            log_level=e.get("IDEALRT_LOG_LEVEL", cls.log_level),
            metrics_port=int(e.get("IDEALRT_METRICS_PORT", "0")),
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
    (or `env`), its address defaulting to all interfaces on its well-known port, and the
    non-empty `flags` (address, store_target, serving_target, store_url, data_dir) over
    both."""
    out = dict(_env(env))
    key = f"IDEALRT_{service.upper()}_ADDRESS"
    out.setdefault(key, f"0.0.0.0:{DEFAULT_PORTS[service]}")
    for name, value in (flags or {}).items():
        if name not in _FLAG_VARS and name != "address":
            raise ValueError(f"unknown flag {name!r} of a standalone service")
        if value:
            out[key if name == "address" else _FLAG_VARS[name]] = value
    return out
