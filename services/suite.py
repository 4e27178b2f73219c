"""The embedded suite (the default of the CLI): store, metrics and profiler as gRPC servers in
this process, serving in a child process of its own, all on loopback ports, a SQLite store
under the data dir. Services still talk to each other over gRPC, as they do when deployed
separately (where each runs with `idealrt serve` / its module; nothing here changes that).

Why serving is a child process: the harness must not compete with what it measures
(design: timing semantics). A profile's stack option `cores` pins the serving process, every
thread of it, to those cores (services/serving/registry.py `_pin`, core/affinity.py); with
serving in this process that pinned the whole suite, so the profiler's, the store's and
gRPC's threads ran on the measured cores and the CPU monitor counted them as our own load.
Now:
- serving is `python -m idealrt.services.serving` (services/_service_process.py): it binds
  port 0 and reports its port with the standalone port line; its stdin is a pipe this
  process holds, so it stops when the suite does, however the suite ends (SIGKILL too);
  its log is `<data dir>/serving.log`; failing to start is a RuntimeError with that log's
  end. Its GetEnvironment reports its own pid, so the profiler's CPU monitor counts the
  child as ours (`_runner_options.default_monitors`, target_env "serving.pid").
- while a profile that pins the child to cores C runs, this process keeps every thread
  off C (the profiler's target factory wraps targets of the child: services/profiler/
  _off_cores.py, core/affinity.py `CoreExclusion`), and widens its affinity again when the
  run ends; the monitor then stops counting this process as ours. With one CPU, or when
  C is all this process has, it stays where it was (and is counted as ours, as before).
  Narrowing for each run, rather than once at start, is what the profile's own options
  allow: the cores are known only when a profile names them.
- store writes still go between samples (ProfilerConfig.background_writes off), which is
  right on a machine where the suite cannot leave the measured cores.

Plaintext and zero-config: the suite ignores IDEALRT_TLS_* and the other IDEALRT_* settings
of the services (a deployment runs each service with `idealrt serve` / its module, which
honour them); the serving child gets only IDEALRT_CACHE_DIR and IDEALRT_LOG_LEVEL (default
warning) of them. Loopback needs nothing; another `host` (`idealrt up --host 0.0.0.0`) is
refused unless IDEALRT_INSECURE=1."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from idealrt.core.config import (
    DEFAULT_DATA_DIR,
    MetricsConfig,
    ProfilerConfig,
    StoreConfig,
)
from idealrt.core.grpc_server import GrpcServer
from idealrt.core.tls import insecure_from_env
from idealrt.services._service_process import START_TIMEOUT_S, ServiceProcess

__all__ = ["Suite", "serving_child_env", "start_suite"]


@dataclasses.dataclass
class Suite:
    store: str
    serving: str
    profiler: str
    metrics: str
    servers: list[GrpcServer]  # in this process: store, metrics, profiler
    data_dir: Path
    serving_process: ServiceProcess | None = None  # the serving child

    @property
    def serving_pid(self) -> int | None:
        return self.serving_process.pid if self.serving_process is not None else None

    def addresses(self) -> dict[str, str]:
        return {
            "store": self.store,
            "serving": self.serving,
            "profiler": self.profiler,
            "metrics": self.metrics,
        }

    def stop(self, grace_s: float = 5.0) -> None:
        # reverse order: profiler stops measuring before serving and store go away
        servers, self.servers = list(reversed(self.servers)), []
        child, self.serving_process = self.serving_process, None
        try:
            for server in servers[:-1]:
                server.stop(grace_s)
        finally:
            try:
                if child is not None:
                    child.stop(grace_s)
            finally:
                for server in servers[-1:]:
                    server.stop(grace_s)

    def __enter__(self) -> Suite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# IDEALRT_* variables the serving child keeps (backends read them themselves)
_CHILD_KEEPS = ("IDEALRT_CACHE_DIR",)


def serving_child_env(address: str, insecure: bool) -> dict[str, str]:
    """The serving child's environment: this process's, without IDEALRT_* settings but
    _CHILD_KEEPS, with its address, log level and (when asked for) IDEALRT_INSECURE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEALRT_") or k in _CHILD_KEEPS}
    env["IDEALRT_SERVING_ADDRESS"] = address
    env["IDEALRT_LOG_LEVEL"] = os.environ.get("IDEALRT_LOG_LEVEL", "") or "warning"
    if insecure:
        env["IDEALRT_INSECURE"] = "1"
    return env


def start_suite(
    data_dir: Path = DEFAULT_DATA_DIR,
    store_url: str = "",
    host: str = "127.0.0.1",
    ports: dict[str, int] | None = None,
    serving_target: str = "",
    resume: bool = True,
    contention_monitors: bool | None = None,
    contention_checks: bool | None = None,
    serving_start_timeout_s: float = START_TIMEOUT_S,
) -> Suite:
    """Start store, serving, metrics and profiler; `serving_target` replaces the local
    serving as the profiler's default endpoint when given. `contention_monitors`: see
    ProfilerConfig (None: $IDEALRT_CONTENTION_MONITORS, default on; off only for test
    suites on shared machines); `contention_checks` likewise
    ($IDEALRT_CONTENTION_CHECKS). RuntimeError when the serving child does not start
    within `serving_start_timeout_s` (nothing is left running)."""
    from idealrt.services.metrics.server import build_server as build_metrics
    from idealrt.services.profiler.outbound import OutboundPolicy
    from idealrt.services.profiler.server import build_server as build_profiler
    from idealrt.services.store.server import build_server as build_store

    ports = ports or {}
    env_cfg = ProfilerConfig.from_env()
    insecure = insecure_from_env()  # plaintext off loopback only when asked for
    data_dir.mkdir(parents=True, exist_ok=True)
    servers: list[GrpcServer] = []

    def addr(name: str) -> str:
        return f"{host}:{ports.get(name, 0)}"

    child = ServiceProcess.spawn(
        "serving",
        serving_child_env(addr("serving"), insecure),
        data_dir / "serving.log",
    )
    try:
        # store and metrics start while the child imports its backends
        store, store_port = build_store(
            StoreConfig(
                address=addr("store"),
                store_url=store_url,
                data_dir=data_dir,
                allow_insecure=insecure,
            )
        )
        servers.append(store)
        store_target = f"{host}:{store_port}"
        metrics, metrics_port = build_metrics(
            MetricsConfig(
                address=addr("metrics"), store_target=store_target, allow_insecure=insecure
            )
        )
        servers.append(metrics)
        serving_addr = f"{host}:{child.wait_listening(serving_start_timeout_s)}"
        profiler, profiler_port = build_profiler(
            ProfilerConfig(
                address=addr("profiler"),
                allow_insecure=insecure,
                store_target=store_target,
                serving_target=serving_target or serving_addr,
                data_dir=data_dir,
                contention_monitors=env_cfg.contention_monitors
                if contention_monitors is None
                else contention_monitors,
                contention_checks=env_cfg.contention_checks
                if contention_checks is None
                else contention_checks,
                # store writes go between samples: on a thread of their own they would
                # take CPU from a timed generation wherever the suite cannot leave the
                # measured cores (ProfilerConfig.background_writes)
                background_writes=bool(serving_target),
                outbound_config=env_cfg.outbound_config,
            ),
            # on loopback and zero-config: HTTP targets may reach loopback hosts, and no
            # credential exists, unless IDEALRT_OUTBOUND_CONFIG says otherwise
            None if env_cfg.outbound_config else OutboundPolicy.loopback(),
            # profiles on the child keep this process off the cores they pin it to
            off_cores_of=serving_addr,
        )
        servers.append(profiler)
    except BaseException:
        for s in reversed(servers):
            s.stop(0)
        child.stop(0)
        raise
    return Suite(
        store=store_target,
        serving=serving_addr,
        profiler=f"{host}:{profiler_port}",
        metrics=f"{host}:{metrics_port}",
        servers=servers,
        data_dir=data_dir,
        serving_process=child,
    )
