"""ProfilerConfig.from_env: the profiler's robustness switches read from the environment."""

from __future__ import annotations

from idealrt.core.config import ProfilerConfig


def test_defaults_write_in_background_and_judge_contention() -> None:
    cfg = ProfilerConfig.from_env({})
    assert cfg.background_writes and cfg.contention_checks and cfg.contention_monitors
    assert cfg.outage_window_s == 300.0


def test_switches_are_read_from_the_environment() -> None:
    cfg = ProfilerConfig.from_env(
        {
            "IDEALRT_BACKGROUND_WRITES": "0",
            "IDEALRT_CONTENTION_CHECKS": "0",
            "IDEALRT_CONTENTION_MONITORS": "0",
            "IDEALRT_OUTAGE_WINDOW_S": "12.5",
        }
    )
    assert not cfg.background_writes
    assert not cfg.contention_checks and not cfg.contention_monitors
    assert cfg.outage_window_s == 12.5


def test_max_message_bytes_is_configured_and_enforced_by_a_real_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """IDEALRT_MAX_MESSAGE_BYTES: a store server on 127.0.0.1 refuses a larger request with
    RESOURCE_EXHAUSTED before its handler runs (nothing is stored)."""
    import grpc
    import pytest

    from idealrt.core.config import StoreConfig
    from idealrt.services.store.server import build_server
    from idealrt.store.v1 import store_service_pb2 as pb
    from idealrt.store.v1 import store_service_pb2_grpc as pbg

    env = {"IDEALRT_MAX_MESSAGE_BYTES": "4096", "IDEALRT_STORE_URL": f"sqlite:///{tmp_path}/s.db"}
    cfg = StoreConfig.from_env(env)
    assert cfg.max_message_bytes == 4096
    with pytest.raises(ValueError, match="IDEALRT_MAX_MESSAGE_BYTES"):
        StoreConfig.from_env({"IDEALRT_MAX_MESSAGE_BYTES": "10"})
    server, port = build_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pbg.StoreServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetProfile(pb.GetProfileRequest(id="x" * 5000), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ListProfiles(pb.ListProfilesRequest(), timeout=10).profiles == []
    finally:
        channel.close()
        server.stop(0)


def test_the_largest_page_is_configured_and_coerced_to_by_a_real_store_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """IDEALRT_MAX_PAGE_SIZE / IDEALRT_MAX_SAMPLE_PAGE_SIZE: a store server on 127.0.0.1
    returns at most that many objects per page (a larger page_size is coerced, AIP-158),
    and the next page token goes on from there."""
    from idealrt.clients.store import StoreClient
    from idealrt.core.config import StoreConfig
    from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec
    from idealrt.services.store.server import build_server

    env = {
        "IDEALRT_MAX_PAGE_SIZE": "2",
        "IDEALRT_MAX_SAMPLE_PAGE_SIZE": "3",
        "IDEALRT_STORE_URL": f"sqlite:///{tmp_path}/s.db",
    }
    cfg = StoreConfig.from_env(env)
    assert (cfg.max_page_size, cfg.max_sample_page_size) == (2, 3)
    server, port = build_server(cfg)
    client = StoreClient(f"127.0.0.1:{port}")
    try:
        for _ in range(3):
            client.create_profile(
                Profile(
                    id="",
                    model=ModelRef(name="m"),
                    stack=StackSpec(),
                    plan=ProfilePlan(prompt_tokens=(8,), output_tokens=(2,)),
                )
            )
        page, token = client.list_profiles(page_size=100)
        assert len(page) == 2 and token
        rest, last = client.list_profiles(page_size=100, page_token=token)
        assert len(rest) == 1 and last == ""
    finally:
        client.close()
        server.stop(0)
