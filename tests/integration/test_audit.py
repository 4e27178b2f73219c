"""The audit log: one `audit` line for every write RPC, whatever its outcome, naming the
caller, the RPC, the object and its namespace (core/grpc_server.py, over a real store
server on 127.0.0.1 with static tokens; reads write no audit line)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing

from idealrt.clients.store import StoreClient
from idealrt.core.auth import AuthConfig, token_sha256
from idealrt.core.config import StoreConfig
from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec
from idealrt.core.errors import PermissionDenied, Unauthenticated
from idealrt.services.store.server import build_server

WRITER, READER = "tok-writer-0123456789", "tok-reader-0123456789"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nsha256 = "{token_sha256(WRITER)}"\nsubject = "alice"\n'
        'roles = { "team-a" = "writer" }\n'
        f'[[token]]\nsha256 = "{token_sha256(READER)}"\nsubject = "bob"\n'
        'roles = { "team-a" = "reader" }\n'
    )
    cfg = StoreConfig(
        address="127.0.0.1:0",
        store_url=f"sqlite:///{tmp_path}/store.db",
        auth=AuthConfig(tokens_file=tokens),
    )
    server, port = build_server(cfg)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _profile() -> Profile:
    return Profile(
        id="",
        model=ModelRef(name="m"),
        stack=StackSpec(),
        plan=ProfilePlan(prompt_tokens=(8,), output_tokens=(2,)),
        namespace="team-a",
    )


def _audits(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "audit"]


def test_every_write_is_audited_with_its_outcome_and_reads_are_not(store: str) -> None:
    with structlog.testing.capture_logs() as logs:
        client = StoreClient(store, token=WRITER)
        try:
            made, _ = client.create_profile(_profile())
            client.get_profile(made.id)  # a read: no audit line
        finally:
            client.close()
        reader = StoreClient(store, token=READER)
        try:
            with pytest.raises(PermissionDenied):
                reader.create_profile(_profile())
        finally:
            reader.close()
        nobody = StoreClient(store)
        try:
            with pytest.raises(Unauthenticated):
                nobody.create_profile(_profile())
        finally:
            nobody.close()
    lines = _audits(logs)
    assert [(a["subject"], a["outcome"]) for a in lines] == [
        ("alice", "OK"),
        ("bob", "PERMISSION_DENIED"),
        ("(unauthenticated)", "UNAUTHENTICATED"),
    ]
    ok = lines[0]
    assert ok["rpc"] == "/idealrt.store.v1.StoreService/CreateProfile"
    assert (ok["object_id"], ok["namespace"]) == (made.id, "team-a")
    assert all(WRITER not in repr(e) and READER not in repr(e) for e in logs)
    assert grpc  # the statuses above came over a real channel
