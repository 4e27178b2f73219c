"""`idealrt profile --gpu-product/--node-pool/--whole-node` (issue 16): the flags reach the
CreateProfile request, and the CLI prints a queued profile's queue position. A fake
ProfilerService on loopback records what the CLI sent."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from idealrt.clients.cli import build_parser, main
from idealrt.clients.cli._profile import build_profile
from idealrt.core import convert as cv
from idealrt.core.domain import Placement, ProfileState
from idealrt.profiler.v1 import profiler_service_pb2 as pb
from idealrt.profiler.v1 import profiler_service_pb2_grpc as pbg


class FakeProfiler(pbg.ProfilerServiceServicer):
    """Answers CreateProfile with the profile it was sent, QUEUED at position 3."""

    def __init__(self) -> None:
        self.requests: list[pb.CreateProfileRequest] = []

    def _queued(self, request: pb.CreateProfileRequest) -> Any:
        p = cv.profile_from_pb(request.profile, new=True)
        return cv.profile_to_pb(dataclasses.replace(p, id="prof_fake", queue_position=3))

    def CreateProfile(self, request: pb.CreateProfileRequest, context: Any) -> Any:
        self.requests.append(request)
        return pb.CreateProfileResponse(profile=self._queued(request))

    def ListProfiles(self, request: pb.ListProfilesRequest, context: Any) -> Any:
        running = cv.profile_to_pb(
            dataclasses.replace(
                cv.profile_from_pb(self._queued(self.requests[0])),
                id="prof_run",
                state=ProfileState.RUNNING,
                queue_position=0,
            )
        )
        return pb.ListProfilesResponse(profiles=[self._queued(self.requests[0]), running])


@pytest.fixture
def profiler() -> Iterator[tuple[FakeProfiler, str]]:
    fake = FakeProfiler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pbg.add_ProfilerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _deployed(address: str) -> list[str]:
    return ["--profiler", address, "--metrics", address, "--store", address]


def test_flags_build_the_placement() -> None:
    flags = ["--gpu-product", "NVIDIA-H100-80GB-HBM3", "--node-pool", "gpu-a", "--whole-node"]
    args = build_parser().parse_args(["profile", "--model", "gpt2-small", *flags])
    assert build_profile(args).placement == Placement("NVIDIA-H100-80GB-HBM3", "gpu-a", True)
    plain = build_profile(build_parser().parse_args(["profile", "--model", "gpt2-small"]))
    assert plain.placement == Placement() and plain.placement.empty


def test_the_flags_reach_the_create_request_and_the_position_is_printed(
    profiler: tuple[FakeProfiler, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, address = profiler
    argv = ["profile", *_deployed(address), "--model", "gpt2-small", "--no-wait"]
    flags = ["--gpu-product", "NVIDIA-A100-SXM4-40GB", "--node-pool", "pool-1", "--whole-node"]
    assert main([*argv, *flags]) == 0
    (request,) = fake.requests
    placement = request.profile.placement
    assert (placement.gpu_product, placement.node_pool, placement.whole_node) == (
        "NVIDIA-A100-SXM4-40GB", "pool-1", True,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "queue position" in out and "3 (1: runs next)" in out and "pool-1" in out


def test_without_flags_no_placement_is_sent(profiler: tuple[FakeProfiler, str]) -> None:
    fake, address = profiler
    assert main(["profile", *_deployed(address), "--model", "gpt2-small", "--no-wait"]) == 0
    assert not fake.requests[0].profile.HasField("placement")


def test_profiles_shows_the_queue_position(
    profiler: tuple[FakeProfiler, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = profiler
    main(["profile", *_deployed(address), "--model", "gpt2-small", "--no-wait"])
    capsys.readouterr()
    assert main(["profiles", *_deployed(address)]) == 0
    out = capsys.readouterr().out
    assert out.count("queued #") == 1 and "queued #3" in out and "running" in out
    assert main(["profiles", *_deployed(address), "--json"]) == 0
    assert '"queue_position": 3' in capsys.readouterr().out
