"""Every RPC of every service is classified for the clients' retry policy
(idealrt.core.grpc_client): retried, or in NOT_RETRIED. A new RPC lands in the retried set
only if it is safe there: a read, a call that carries a request_id/batch_id, or one named
here as idempotent by design (so adding a mutating RPC fails this test until someone
decides)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from google.protobuf.descriptor import MethodDescriptor

from idealrt.core.grpc_client import (
    NOT_RETRIED,
    RETRY_POLICY,
    all_methods,
    retried_methods,
    service_config,
)

GEN = Path(__file__).resolve().parents[2] / "gen" / "idealrt"

READ_PREFIXES = ("Get", "List", "Watch", "Compute", "Compare", "Export", "Estimate")
# Mutations whose replay leaves the same result (read in their servers): UpdateProfile
# writes the mutable fields whole (a terminal profile takes only an identical update);
# CancelProfile of a cancelled profile changes nothing (FAILED_PRECONDITION);
# UnloadModel of an unloaded model changes nothing (NOT_FOUND).
IDEMPOTENT_BY_DESIGN = frozenset(
    {
        "idealrt.store.v1.StoreService/UpdateProfile",
        "idealrt.profiler.v1.ProfilerService/CancelProfile",
        "idealrt.serving.v1.ServingService/UnloadModel",
    }
)


def _descriptors() -> dict[str, MethodDescriptor]:
    """Every method of every service in every generated *_pb2.py under gen/."""
    out: dict[str, MethodDescriptor] = {}
    for path in sorted(GEN.glob("*/v1/*_pb2.py")):
        rel = path.relative_to(GEN.parent).with_suffix("")
        module = importlib.import_module(".".join(rel.parts))
        for svc in module.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                out[f"{svc.full_name}/{m.name}"] = m
    return out


def test_every_generated_rpc_is_classified() -> None:
    generated = _descriptors()
    assert len(generated) > 20  # the glob found the services
    assert set(all_methods()) == set(generated)  # no service module left out
    retried = set(retried_methods())
    assert retried | NOT_RETRIED == set(generated)
    assert not retried & NOT_RETRIED
    assert set(generated) >= NOT_RETRIED  # no stale name


def test_the_non_retried_are_the_measurement_and_the_client_stream() -> None:
    assert {
        "idealrt.serving.v1.ServingService/Generate",
        "idealrt.metrics.v1.MetricsService/StreamEstimateRuntime",
    } == NOT_RETRIED
    streaming_in = {n for n, m in _descriptors().items() if m.client_streaming}
    assert streaming_in <= NOT_RETRIED  # grpc cannot retry them


def test_every_retried_rpc_is_safe_to_replay() -> None:
    generated = _descriptors()
    unsafe = []
    for name in retried_methods():
        m = generated[name]
        fields = {f.name for f in m.input_type.fields}
        if m.name.startswith(READ_PREFIXES):
            continue
        if fields & {"request_id", "batch_id"} or name in IDEMPOTENT_BY_DESIGN:
            continue
        unsafe.append(name)
    assert unsafe == []


def test_the_service_config_retries_unavailable_with_the_agreed_backoff() -> None:
    config = json.loads(service_config())
    (method_config,) = config["methodConfig"]
    names = {f"{n['service']}/{n['method']}" for n in method_config["name"]}
    assert names == set(retried_methods())
    policy = method_config["retryPolicy"]
    assert policy == RETRY_POLICY
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == 5
    assert policy["initialBackoff"] == "0.1s" and policy["maxBackoff"] == "5s"
    assert policy["backoffMultiplier"] == 2


def test_every_client_opens_its_channel_with_the_policy() -> None:
    """The clients build their channels through ClientChannel, with open_channel (which sets
    the service config and, given a TlsConfig, the TLS credentials), never a bare
    grpc.insecure_channel or secure_channel."""
    clients = Path(__file__).resolve().parents[2] / "clients"
    base = (clients / "_channel.py").read_text()
    assert "open_channel(target, tls)" in base
    for name in ("metrics.py", "profiler.py", "serving.py", "store.py"):
        text = (clients / name).read_text()
        assert "(ClientChannel):" in text and "_STUB = pbg." in text, name
        assert "insecure_channel" not in text and "secure_channel" not in text, name
