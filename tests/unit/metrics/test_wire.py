"""The servicer's fast conversions (services/metrics/servicer.py) against the plain
per-message ones: every request type's queries, zeros and negatives, unknown fields a
client put inside a query, and responses built from bytes equal to built from messages."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import message

from idealrt.metrics.v1 import metrics_service_pb2 as pb
from idealrt.services.metrics import servicer as sv

REQUESTS = [
    pb.EstimateRuntimeRequest,
    pb.ComputeCostRequest,
    pb.CompareCostModelsRequest,
    pb.ComputeParetoRequest,
]


def _plain(req: message.Message) -> tuple[list[int], list[int]]:
    qs = req.queries  # type: ignore[attr-defined]
    return [q.prompt_tokens for q in qs], [q.output_tokens for q in qs]


def _request(kind: type[message.Message], p: list[int], o: list[int]) -> message.Message:
    req = kind(
        queries=[pb.Query(prompt_tokens=a, output_tokens=b) for a, b in zip(p, o, strict=True)]
    )
    # the other fields set, so the view has something to skip
    if kind is pb.EstimateRuntimeRequest:
        req.cost_model_id, req.per_query, req.intervals = "cm_x", True, True  # type: ignore[attr-defined]
    elif kind is pb.CompareCostModelsRequest:
        req.profile_id_a, req.bootstrap, req.seed = "prof_a", 20, 3  # type: ignore[attr-defined]
    elif kind is pb.ComputeCostRequest:
        req.accelerator, req.price_per_hour_usd["x"] = "A100-80GB", 2.0  # type: ignore[attr-defined]
    return kind.FromString(req.SerializeToString())


@pytest.mark.parametrize("kind", REQUESTS)
@pytest.mark.parametrize("n", [0, 1, sv._SMALL - 1, sv._SMALL, 5000])
def test_query_columns_are_the_queries(kind: type[message.Message], n: int) -> None:
    rng = np.random.default_rng(n)
    p = rng.integers(1, 2**31 - 1, size=n).tolist()
    o = rng.integers(1, 300, size=n).tolist()
    got_p, got_o = sv._query_columns(_request(kind, p, o))
    assert got_p.tolist() == p and got_o.tolist() == o


@pytest.mark.parametrize("kind", REQUESTS)
def test_zeros_and_negatives_keep_their_places(kind: type[message.Message]) -> None:
    n = 200
    p, o = list(range(1, n + 1)), [7] * n
    p[5], o[9], p[150], o[150], p[33] = 0, 0, 0, 0, -(2**31)
    req = _request(kind, p, o)
    got_p, got_o = sv._query_columns(req)
    assert (got_p.tolist(), got_o.tolist()) == (p, o) == _plain(req)


def _unknown_inside_queries(n: int) -> bytes:
    """A request of n queries (i+1, 3) whose query 7 carries no prompt_tokens but an
    unknown field numbered 1 as a packed list [9, 9] (and query 8 no prompt_tokens): what
    a view that kept unknown fields would read as prompt_tokens 9, 9."""
    out = bytearray()
    for i in range(n):
        if i == 7:
            body = b"\x0a\x02\x09\x09" + b"\x10\x03"
        elif i == 8:
            body = b"\x10\x03"
        else:
            body = pb.Query(prompt_tokens=i + 1, output_tokens=3).SerializeToString()
        body += b"\xa8\x06\x01"  # an unknown varint field (101) in every query
        out += b"\x12" + bytes([len(body)]) + body
    return bytes(out)


def test_unknown_fields_inside_queries_are_not_read_as_counts() -> None:
    req = pb.EstimateRuntimeRequest.FromString(_unknown_inside_queries(100))
    want = _plain(req)
    assert want[0][7] == want[0][8] == 0
    got_p, got_o = sv._query_columns(req)
    assert (got_p.tolist(), got_o.tolist()) == want


def test_responses_built_from_bytes_equal_responses_built_from_messages() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    rt, lo, hi = rng.random(n), rng.random(n), rng.random(n)
    lo[:10] = 0.0  # zeros: proto3 leaves them off the wire, these records do not
    ood = rng.random(n) < 0.3
    got = pb.EstimateRuntimeResponse()
    sv._merge_estimates(got, rt, lo, hi, ood)
    want = pb.EstimateRuntimeResponse(
        estimates=[
            pb.QueryEstimate(
                runtime_seconds=float(a), low_seconds=float(b), high_seconds=float(c),
                out_of_domain=bool(d),
            )
            for a, b, c, d in zip(rt, lo, hi, ood, strict=True)
        ]
    )  # fmt: skip
    assert got == want
    assert pb.EstimateRuntimeResponse.FromString(got.SerializeToString()) == want
    cols = pb.EstimateRuntimeResponse()
    sv._merge_doubles(cols, "runtime_seconds", rt)
    sv._merge_bools(cols, "out_of_domain", ood)
    sv._merge_doubles(cols, "low_seconds", np.zeros(0))
    assert cols == pb.EstimateRuntimeResponse(
        runtime_seconds=rt.tolist(), out_of_domain=ood.tolist()
    )
    empty = pb.EstimateRuntimeResponse()
    sv._merge_estimates(empty, np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, bool))
    assert empty == pb.EstimateRuntimeResponse()
