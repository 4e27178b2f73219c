"""Namespaces in the store (issue 13): objects are created in a namespace and stay there;
reads narrowed to some namespaces see nothing else (NOT_FOUND exactly as for a missing id,
lists and counts filtered); a cost model lives in its profile's namespace; names are DNS
labels. The store tests run on SQLite (file, memory) and PostgreSQL (conftest); the
migration from schema 1 on the durable backends; the servicer's authorization with
principals put in place as the interceptor would; and the filter over a real server."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idealrt.clients.store import StoreClient
from idealrt.common.v1 import resources_pb2 as rpb
from idealrt.core import convert as cv
from idealrt.core.auth import (
    ANONYMOUS_ADMIN,
    AuthConfig,
    Principal,
    Role,
    acting_as,
    token_sha256,
)
from idealrt.core.config import StoreConfig
from idealrt.core.domain import (
    DEFAULT_NAMESPACE,
    CostModel,
    FitQuality,
    Profile,
    ProfileState,
    Sample,
)
from idealrt.core.errors import IdealrtError, InvalidArgument, NotFound, PermissionDenied
from idealrt.core.namespaces import check_namespace, check_namespace_filter, intersect
from idealrt.services.store import _rows, _serde, schema
from idealrt.services.store.repository import Store, open_store
from idealrt.services.store.server import build_server
from idealrt.services.store.servicer import StoreServicer
from idealrt.services.store.url import create_store_engine, parse_store_url
from idealrt.store.v1 import store_service_pb2 as pb
from idealrt.store.v1 import store_service_pb2_grpc as pbg

MakeProfile = Callable[..., Profile]
MakeSample = Callable[..., Sample]
A, B = frozenset({"team-a"}), frozenset({"team-b"})


def _cm(profile_id: str = "", namespace: str = DEFAULT_NAMESPACE, **changes: Any) -> CostModel:
    return dataclasses.replace(
        CostModel(
            id="",
            profile_id=profile_id,
            alpha_knots_p=(1, 64, 512),
            alpha_knots_s=(0.02, 0.03, 0.07),
            beta0_s=0.02,
            beta1_s=1e-7,
            quality=FitQuality("kfold", 9, 0.01, 0.02, 0.03),
            valid_prompt_tokens=(1, 512),
            valid_output_tokens=(1, 64),
            namespace=namespace,
        ),
        **changes,
    )


def _error(call: Callable[[], object]) -> tuple[object, ...]:
    """Everything a caller learns from the error `call` raises."""
    with pytest.raises(IdealrtError) as info:
        call()
    e = info.value
    return (type(e), e.code, e.reason, e.message, e.field)


@pytest.fixture
def empty() -> Iterator[Store]:
    """A store where nothing exists: what "as if it did not exist" answers."""
    st = open_store("sqlite://")
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def two(store: Store, make_profile: MakeProfile, make_sample: MakeSample) -> dict[str, Any]:
    """A profile with samples and a cost model in each of team-a and team-b."""
    out: dict[str, Any] = {}
    for ns in ("team-a", "team-b"):
        p, _ = store.create_profile(make_profile(namespace=ns))
        store.append_samples(p.id, "b0", [make_sample(i) for i in range(3)])
        cm, _ = store.create_cost_model(_cm(p.id, ns))
        out[ns] = (p, cm)
    return out


# ---- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "a", "team-a", "0", "a" * 63, "x-1-y"])
def test_dns_labels_are_namespaces(name: str) -> None:
    assert check_namespace(name, "namespace") == name


@pytest.mark.parametrize(
    "name", ["Team-a", "team_a", "-a", "a-", "a" * 64, "a.b", " a", "é", "a\n", "*"]
)
def test_other_names_are_refused_naming_the_field_and_the_rule(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_namespace(name, "profile.namespace")
    e = info.value
    assert (e.reason, e.field) == ("NAMESPACE_INVALID", "profile.namespace")
    assert "DNS label" in e.message and "profile.namespace" in e.message


def test_empty_is_default_and_filters_are_visibility_sets() -> None:
    assert check_namespace("", "namespace") == DEFAULT_NAMESPACE
    assert check_namespace_filter([], "namespaces") is None
    assert check_namespace_filter(["team-a", ""], "namespaces") == {"team-a", "default"}
    with pytest.raises(InvalidArgument) as info:
        check_namespace_filter(["team-a", "Nope"], "namespaces")
    assert (info.value.reason, info.value.field) == ("NAMESPACE_INVALID", "namespaces[1]")
    with pytest.raises(InvalidArgument) as info:
        check_namespace_filter([f"n{i}" for i in range(257)], "namespaces")
    assert info.value.field == "namespaces"
    assert intersect(None, A) == A and intersect(A, None) == A and intersect(None, None) is None
    assert intersect(A, B) == frozenset() and intersect(A | B, B) == B


# ---- converters --------------------------------------------------------------------------


def test_converters_round_trip_the_namespace(make_profile: MakeProfile) -> None:
    p = make_profile(id="prof_1", namespace="team-a")
    assert cv.profile_to_pb(p).namespace == "team-a"
    assert cv.profile_from_pb(cv.profile_to_pb(p)) == p
    assert cv.profile_from_pb(cv.profile_to_pb(p), new=True).namespace == "team-a"
    cm = _cm("prof_1", "team-a", id="cm_1")
    assert cv.cost_model_to_pb(cm).namespace == "team-a"
    assert cv.cost_model_from_pb(cv.cost_model_to_pb(cm)) == cm


def test_converters_read_an_empty_namespace_as_default(make_profile: MakeProfile) -> None:
    msg = cv.profile_to_pb(make_profile(namespace="team-a"))
    msg.namespace = ""
    assert cv.profile_from_pb(msg).namespace == DEFAULT_NAMESPACE
    assert cv.cost_model_from_pb(rpb.CostModel()).namespace == DEFAULT_NAMESPACE


def test_converters_refuse_an_invalid_namespace_naming_the_field(
    make_profile: MakeProfile,
) -> None:
    msg = cv.profile_to_pb(make_profile())
    msg.namespace = "Team A"
    with pytest.raises(InvalidArgument) as info:
        cv.profile_from_pb(msg)
    assert (info.value.reason, info.value.field) == ("NAMESPACE_INVALID", "profile.namespace")
    cm = cv.cost_model_to_pb(_cm())
    cm.namespace = "a" * 64
    with pytest.raises(InvalidArgument) as info:
        cv.cost_model_from_pb(cm)
    assert (info.value.reason, info.value.field) == ("NAMESPACE_INVALID", "cost_model.namespace")


def test_rows_and_serde_round_trip_the_namespace(make_profile: MakeProfile) -> None:
    cm = _cm("prof_1", "team-a", id="cm_1")
    assert _serde.loads(CostModel, _serde.dumps(cm)) == cm
    row = _rows.cost_model_row(cm)
    assert row["namespace"] == "team-a" and "namespace" not in row["payload"]
    assert _rows.cost_model_from_row(row) == cm
    p = make_profile(id="prof_1", namespace="team-b")
    row = _rows.profile_row(p, update_time=datetime(2026, 1, 1, tzinfo=UTC))
    assert row["namespace"] == "team-b" and _rows.profile_from_row(row) == p


# ---- the store ---------------------------------------------------------------------------


def test_objects_are_created_in_their_namespace(store: Store, make_profile: MakeProfile) -> None:
    p, _ = store.create_profile(make_profile(namespace="team-a"))
    assert p.namespace == "team-a" and store.get_profile(p.id).namespace == "team-a"
    d, _ = store.create_profile(make_profile())
    assert d.namespace == DEFAULT_NAMESPACE
    e, _ = store.create_profile(make_profile(namespace=""))
    assert e.namespace == DEFAULT_NAMESPACE
    cm, _ = store.create_cost_model(_cm(namespace="team-b"))  # no profile: any namespace
    assert store.get_cost_model(cm.id).namespace == "team-b"


def test_lists_are_filtered(store: Store, two: dict[str, Any], make_profile: MakeProfile) -> None:
    (pa, cma), (pb_, cmb) = two["team-a"], two["team-b"]
    pd, _ = store.create_profile(make_profile())

    def ids(namespaces: frozenset[str] | None, **kw: Any) -> set[str]:
        return {p.id for p in store.list_profiles(0, "", namespaces=namespaces, **kw)[0]}

    assert ids(None) == {pa.id, pb_.id, pd.id}
    assert ids(A) == {pa.id}
    assert ids(A | B) == {pa.id, pb_.id}
    assert ids(frozenset({"default"})) == {pd.id}
    assert ids(frozenset()) == set()
    assert ids(frozenset({"nobody"})) == set()
    assert ids(A, state=ProfileState.QUEUED) == {pa.id}
    assert ids(A, state=ProfileState.RUNNING) == set()
    assert [c.id for c in store.list_cost_models(0, "", namespaces=B)[0]] == [cmb.id]
    assert store.list_cost_models(0, "", pa.id, namespaces=B) == ([], "")
    assert [c.id for c in store.list_cost_models(0, "", pa.id, namespaces=A)[0]] == [cma.id]
    assert {p.id for p in store.unfinished_profiles(A)} == {pa.id}


def test_pages_of_a_filtered_list(store: Store, make_profile: MakeProfile) -> None:
    made = [store.create_profile(make_profile(namespace=ns))[0] for ns in ["team-a", "team-b"] * 3]
    seen, token = [], ""
    while True:
        page, token = store.list_profiles(1, token, namespaces=A)
        seen += page
        if not token:
            break
    assert [p.id for p in seen] == [p.id for p in reversed(made) if p.namespace == "team-a"]
    _, token = store.list_profiles(1, "", namespaces=A)
    with pytest.raises(InvalidArgument) as info:  # a token belongs to its filter
        store.list_profiles(1, token, namespaces=B)
    assert info.value.reason == "PAGE_TOKEN_INVALID"
    with pytest.raises(InvalidArgument):
        store.list_profiles(1, token)


def test_get_in_another_namespace_is_not_found_as_if_missing(
    store: Store, empty: Store, two: dict[str, Any]
) -> None:
    pa, cma = two["team-a"]
    assert store.get_profile(pa.id, A) == pa
    missing = _error(lambda: empty.get_profile(pa.id))
    assert missing[0] is NotFound
    assert _error(lambda: store.get_profile(pa.id, B)) == missing
    assert _error(lambda: store.get_profile(pa.id, frozenset())) == missing
    missing_cm = _error(lambda: empty.get_cost_model(cma.id))
    assert _error(lambda: store.get_cost_model(cma.id, B)) == missing_cm
    assert store.get_cost_model(cma.id, A | B) == cma


def test_samples_of_a_profile_in_another_namespace_are_not_found(
    store: Store, empty: Store, two: dict[str, Any], make_sample: MakeSample
) -> None:
    pa, _ = two["team-a"]
    calls: list[Callable[[Store, frozenset[str] | None], object]] = [
        lambda st, ns: st.list_samples(pa.id, 0, "", ns),
        lambda st, ns: st.all_samples(pa.id, ns),
        lambda st, ns: st.count_samples(pa.id, ns),
        lambda st, ns: st.append_samples(pa.id, "b1", [make_sample(9)], ns),
    ]
    for call in calls:
        assert _error(lambda c=call: c(store, B)) == _error(lambda c=call: c(empty, None))
    assert store.count_samples(pa.id, A) == 3 == len(store.all_samples(pa.id, A))
    assert store.append_samples(pa.id, "b1", [make_sample(9)], A) == 1
    assert store.count_samples(pa.id) == 4


def test_update_never_moves_a_profile(store: Store, empty: Store, two: dict[str, Any]) -> None:
    pa, _ = two["team-a"]
    moved = dataclasses.replace(pa, state=ProfileState.RUNNING, namespace="team-b")
    assert _error(lambda: store.update_profile(moved, B)) == _error(
        lambda: empty.update_profile(moved)
    )
    assert store.get_profile(pa.id).state is ProfileState.QUEUED
    updated = store.update_profile(moved, A)
    assert (updated.state, updated.namespace) == (ProfileState.RUNNING, "team-a")
    assert store.get_profile(pa.id, A) == updated
    assert store.list_profiles(0, "", namespaces=B)[0] == [two["team-b"][0]]


def test_a_cost_model_lives_in_its_profiles_namespace(
    store: Store, empty: Store, two: dict[str, Any]
) -> None:
    pa, _ = two["team-a"]
    before = store.list_cost_models(1000, "")[0]
    with pytest.raises(InvalidArgument) as info:
        store.create_cost_model(_cm(pa.id, "team-b"))
    assert (info.value.reason, info.value.field) == ("NAMESPACE_MISMATCH", "namespace")
    with pytest.raises(InvalidArgument):
        store.create_cost_model(_cm(pa.id))  # "default" is a namespace like the others
    # a profile the caller cannot see is missing, whatever the namespaces
    missing = _error(lambda: empty.create_cost_model(_cm(pa.id, "team-b")))
    assert missing[0] is NotFound
    assert _error(lambda: store.create_cost_model(_cm(pa.id, "team-b"), B)) == missing
    assert store.list_cost_models(1000, "")[0] == before


def test_invalid_namespaces_are_refused_naming_the_field(
    store: Store, make_profile: MakeProfile
) -> None:
    for call, field in [
        (lambda: store.create_profile(make_profile(namespace="Team-A")), "namespace"),
        (lambda: store.create_cost_model(_cm(namespace="team_a")), "namespace"),
        (lambda: store.list_profiles(0, "", namespaces=frozenset({"A"})), "namespaces"),
        (lambda: store.get_profile("prof_x", frozenset({"-"})), "namespaces"),
        (lambda: store.list_profiles(0, "", namespaces=["team-a"]), "namespaces"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.field == field, field
        assert info.value.reason in ("NAMESPACE_INVALID", "VALUE_INVALID")
    assert store.list_profiles(0, "") == ([], "")


def test_a_request_id_of_another_namespace_names_nothing(
    store: Store, make_profile: MakeProfile
) -> None:
    pa, created = store.create_profile(make_profile(namespace="team-a", request_id="r-1"))
    assert created and store.create_profile(make_profile(namespace="team-a", request_id="r-1")) == (
        pa,
        False,
    )
    with pytest.raises(IdealrtError) as info:
        store.create_profile(make_profile(namespace="team-b", request_id="r-1"))
    assert info.value.reason == "REQUEST_ID_REUSED" and pa.id not in info.value.message
    cm, _ = store.create_cost_model(_cm(namespace="team-a", request_id="r-2"))
    with pytest.raises(IdealrtError) as info:
        store.create_cost_model(_cm(namespace="team-b", request_id="r-2"))
    assert info.value.reason == "REQUEST_ID_REUSED" and cm.id not in info.value.message


# ---- migration from schema 1 -------------------------------------------------------------


def _engine(url: str) -> sa.Engine:
    return create_store_engine(parse_store_url(url))


def _v1_sample_row(s: Sample, *, profile_id: str, batch_id: str, seq: int) -> dict[str, Any]:
    """A sample's row in the v1 shape: without the columns later migrations added."""
    row = _rows.sample_row(s, profile_id=profile_id, batch_id=batch_id, seq=seq)
    for added in ("timing", "chunks"):  # v3
        del row[added]
    return row


def test_a_version_1_database_upgrades_into_default(
    durable_store_url: str,
    make_profile: MakeProfile,
    make_sample: MakeSample,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A database as idealrt wrote it before namespaces: the migrations stopped at 1, rows in
    # the v1 tables' shape (the frozen v1 metadata: no namespace column).
    with monkeypatch.context() as m:
        m.setattr(schema, "SCHEMA_VERSION", 1)
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        engine = _engine(durable_store_url)
        try:
            schema.migrate(engine)
            v1 = schema._v1_metadata().tables
            now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
            profile = make_profile(id="prof_old", request_id="req-old", create_time=now)
            cm = _cm("prof_old", id="cm_old", create_time=now, name="old fit")
            with engine.begin() as conn:
                assert schema.current_version(conn) == 1
                assert "namespace" not in {
                    c["name"] for c in sa.inspect(conn).get_columns("profiles")
                }
                prow = _rows.profile_row(profile, update_time=now)
                del prow["namespace"]
                conn.execute(v1["profiles"].insert().values(prow))
                batch = [make_sample(i) for i in range(4)]
                conn.execute(
                    v1["sample_batches"]
                    .insert()
                    .values(
                        profile_id="prof_old", batch_id="b0", first_seq=0, count=4, create_time=now
                    )
                )
                conn.execute(
                    v1["samples"].insert(),
                    [
                        _v1_sample_row(s, profile_id="prof_old", batch_id="b0", seq=i)
                        for i, s in enumerate(batch)
                    ],
                )
                crow = _rows.cost_model_row(cm)
                del crow["namespace"]
                conn.execute(v1["cost_models"].insert().values(crow))
        finally:
            engine.dispose()

    with open_store(durable_store_url) as st:
        with st._engine.connect() as conn:
            assert schema.current_version(conn) == schema.SCHEMA_VERSION
        p = st.get_profile("prof_old", frozenset({"default"}))
        assert p == dataclasses.replace(profile, namespace="default")
        assert st.all_samples("prof_old", frozenset({"default"})) == [
            dataclasses.replace(s, seq=i) for i, s in enumerate(batch)
        ]
        assert st.count_samples("prof_old") == 4
        assert st.get_cost_model("cm_old") == dataclasses.replace(cm, namespace="default")
        assert st.list_profiles(0, "", namespaces=frozenset({"default"}))[0] == [p]
        assert st.list_profiles(0, "", namespaces=A) == ([], "")
        assert st.list_cost_models(0, "", "prof_old")[0] == [st.get_cost_model("cm_old")]
        # still a working store: idempotent replays, appends, new namespaces
        assert st.create_profile(make_profile(request_id="req-old")) == (p, False)
        assert st.append_samples("prof_old", "b0", batch) == 4  # a replay: nothing written
        assert st.append_samples("prof_old", "b1", [make_sample(7)]) == 1
        new, _ = st.create_profile(make_profile(namespace="team-a"))
        assert st.list_profiles(0, "", namespaces=A)[0] == [new]

    engine = _engine(durable_store_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.select(schema.schema_version.c.version)).scalars()
            assert sorted(versions) == list(range(1, schema.SCHEMA_VERSION + 1))
            inspector = sa.inspect(conn)
            for table in ("profiles", "cost_models"):
                col = next(c for c in inspector.get_columns(table) if c["name"] == "namespace")
                assert not col["nullable"] and "default" in str(col["default"])
            indexes = {
                i["name"] for t in ("profiles", "cost_models") for i in inspector.get_indexes(t)
            }
            assert {
                "ix_profiles_namespace_create_time_id",
                "ix_profiles_namespace_state_create_time_id",
                "ix_cost_models_namespace_create_time_id",
            } <= indexes
            rows = conn.execute(sa.select(schema.profiles.c.namespace)).scalars().all()
            assert sorted(rows) == ["default", "team-a"]
    finally:
        engine.dispose()


def test_the_current_tables_are_what_the_migrations_build(durable_store_url: str) -> None:
    """`schema.metadata` (what the code queries) matches the migrated database."""
    open_store(durable_store_url).close()
    engine = _engine(durable_store_url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            for table in schema.metadata.sorted_tables:
                columns = {c["name"]: c for c in inspector.get_columns(table.name)}
                assert set(columns) == {c.name for c in table.columns}, table.name
                for c in table.columns:
                    assert columns[c.name]["nullable"] == c.nullable, (table.name, c.name)
                indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes(table.name)}
                for ix in table.indexes:
                    assert indexes.get(ix.name) == [c.name for c in ix.columns], ix.name
    finally:
        engine.dispose()


# ---- the servicer's authorization ----------------------------------------------------------


def _principal(**roles: Role) -> Principal:
    return Principal("tester", {k.replace("_", "-"): v for k, v in roles.items()})


@pytest.fixture
def authz(store: Store, two: dict[str, Any]) -> tuple[StoreServicer, dict[str, Any]]:
    return StoreServicer(store), two


def test_readers_see_only_their_namespaces(
    authz: tuple[StoreServicer, dict[str, Any]], empty: Store
) -> None:
    sv, two = authz
    (pa, cma), (pb_, cmb) = two["team-a"], two["team-b"]
    ctx: Any = None
    with acting_as(_principal(team_a=Role.READER)):
        listed = sv.ListProfiles(pb.ListProfilesRequest(), ctx)
        assert [p.id for p in listed.profiles] == [pa.id]
        filtered = sv.ListProfiles(pb.ListProfilesRequest(namespaces=["team-b"]), ctx)
        assert list(filtered.profiles) == []
        assert [c.id for c in sv.ListCostModels(pb.ListCostModelsRequest(), ctx).cost_models] == [
            cma.id
        ]
        assert sv.GetProfile(pb.GetProfileRequest(id=pa.id), ctx).profile.namespace == "team-a"
        empty_sv = StoreServicer(empty)
        for req, method in [
            (pb.GetProfileRequest(id=pb_.id), "GetProfile"),
            (pb.GetCostModelRequest(id=cmb.id), "GetCostModel"),
            (pb.ListSamplesRequest(profile_id=pb_.id), "ListSamples"),
        ]:
            hidden = _error(lambda r=req, m=method: getattr(sv, m)(r, ctx))
            assert hidden == _error(lambda r=req, m=method: getattr(empty_sv, m)(r, ctx))
    with acting_as(_principal(team_a=Role.READER, team_b=Role.READER)):
        both = sv.ListProfiles(pb.ListProfilesRequest(namespaces=["team-b"]), ctx)
        assert [p.id for p in both.profiles] == [pb_.id]


def test_writes_need_the_writer_role_in_the_objects_namespace(
    authz: tuple[StoreServicer, dict[str, Any]],
    empty: Store,
    make_profile: MakeProfile,
    make_sample: MakeSample,
) -> None:
    sv, two = authz
    (pa, _), (pb_, _) = two["team-a"], two["team-b"]
    ctx: Any = None
    running = cv.profile_to_pb(dataclasses.replace(pa, state=ProfileState.RUNNING))
    append = pb.AppendSamplesRequest(
        profile_id=pa.id, batch_id="b9", samples=[cv.sample_to_pb(make_sample(1))]
    )
    create = pb.CreateProfileRequest(profile=cv.profile_to_pb(make_profile(namespace="team-a")))
    fit = pb.CreateCostModelRequest(cost_model=cv.cost_model_to_pb(_cm(pa.id, "team-a")))
    with acting_as(_principal(team_a=Role.READER)):
        for method, req in [
            ("UpdateProfile", pb.UpdateProfileRequest(profile=running)),
            ("AppendSamples", append),
            ("CreateProfile", create),
            ("CreateCostModel", fit),
        ]:
            with pytest.raises(PermissionDenied) as info:
                getattr(sv, method)(req, ctx)
            assert info.value.reason == "NAMESPACE_FORBIDDEN", method
    with acting_as(_principal(team_b=Role.WRITER)):
        empty_sv = StoreServicer(empty)
        # the profiler's write path: a team's writer may not use it at all, and the answer
        # is the same whether the profile exists (in another namespace) or not
        for method, req in [
            ("UpdateProfile", pb.UpdateProfileRequest(profile=running)),
            ("AppendSamples", append),
        ]:
            hidden = _error(lambda m=method, r=req: getattr(sv, m)(r, ctx))
            assert hidden[0] is PermissionDenied
            assert hidden == _error(lambda m=method, r=req: getattr(empty_sv, m)(r, ctx))
        with pytest.raises(PermissionDenied):
            sv.CreateProfile(create, ctx)
        # a cost model in its own namespace for a profile it cannot see: missing
        other = pb.CreateCostModelRequest(cost_model=cv.cost_model_to_pb(_cm(pa.id, "team-b")))
        assert _error(lambda: sv.CreateCostModel(other, ctx))[0] is NotFound
    with acting_as(_principal(team_a=Role.WRITER)):
        with pytest.raises(PermissionDenied):  # a team's writer: not the profiler
            sv.AppendSamples(append, ctx)
        assert sv.CreateProfile(create, ctx).profile.namespace == "team-a"
        assert sv.CreateCostModel(fit, ctx).cost_model.namespace == "team-a"
    with acting_as(ANONYMOUS_ADMIN):  # an operator (the profiler's service identity)
        # the stored namespace wins: naming team-b in the update does not move it
        moved = cv.profile_to_pb(
            dataclasses.replace(pa, state=ProfileState.RUNNING, namespace="team-b")
        )
        updated = sv.UpdateProfile(pb.UpdateProfileRequest(profile=moved), ctx).profile
        assert (updated.namespace, updated.state) == ("team-a", rpb.PROFILE_STATE_RUNNING)
        assert sv.AppendSamples(append, ctx).total_samples == 4
    assert sv.store.get_profile(pb_.id) == pb_  # untouched


# ---- over a real server --------------------------------------------------------------------


def _info(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    return err.code(), detail.reason, detail.metadata.get("field", "")


def test_list_profiles_with_a_namespace_filter_over_a_server(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    cfg = StoreConfig(address="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/store.db")
    server, port = build_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        client = StoreClient(channel, timeout=30)
        made = {ns: client.create_profile(make_profile(namespace=ns))[0] for ns in ("team-a", "")}
        assert made[""].namespace == "default"
        assert client.list_profiles(namespaces=["team-a"])[0] == [made["team-a"]]
        assert client.list_profiles(namespaces=[""])[0] == [made[""]]
        assert len(client.list_profiles()[0]) == 2
        cm, _ = client.create_cost_model(_cm(made["team-a"].id, "team-a"))
        assert client.list_cost_models(namespaces=["team-a"])[0] == [cm]
        assert client.list_cost_models(namespaces=["default"]) == ([], "")
        stub = pbg.StoreServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListProfiles(pb.ListProfilesRequest(namespaces=["ok", "Not OK"]), timeout=30)
        assert _info(info.value) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "NAMESPACE_INVALID",
            "namespaces[1]",
        )
        bad = cv.profile_to_pb(make_profile())
        bad.namespace = "UPPER"
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateProfile(pb.CreateProfileRequest(profile=bad), timeout=30)
        assert _info(info.value) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "NAMESPACE_INVALID",
            "profile.namespace",
        )
    finally:
        channel.close()
        server.stop(0)


def test_tokens_of_one_namespace_over_a_server(tmp_path: Path, make_profile: MakeProfile) -> None:
    """With authentication on (static tokens), a team-a reader's lists and gets see team-a
    only, and another namespace's profile is NOT_FOUND like a missing one."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nsha256 = "{token_sha256("admin-token")}"\nsubject = "ops"\n'
        'roles = { "*" = "admin" }\n'
        f'[[token]]\nsha256 = "{token_sha256("reader-token")}"\nsubject = "a-reader"\n'
        'roles = { "team-a" = "reader" }\n'
    )
    cfg = StoreConfig(
        address="127.0.0.1:0",
        store_url=f"sqlite:///{tmp_path}/store.db",
        auth=AuthConfig(tokens_file=tokens),
    )
    server, port = build_server(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pbg.StoreServiceStub(channel)

    def as_(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    try:
        made = {}
        for ns in ("team-a", "team-b"):
            req = pb.CreateProfileRequest(profile=cv.profile_to_pb(make_profile(namespace=ns)))
            made[ns] = stub.CreateProfile(req, timeout=30, metadata=as_("admin-token")).profile
        listed = stub.ListProfiles(
            pb.ListProfilesRequest(), timeout=30, metadata=as_("reader-token")
        )
        assert [p.id for p in listed.profiles] == [made["team-a"].id]
        errors = []
        for pid in (made["team-b"].id, "prof_000000000000"):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetProfile(
                    pb.GetProfileRequest(id=pid), timeout=30, metadata=as_("reader-token")
                )
            errors.append((*_info(info.value), info.value.details().replace(pid, "<id>")))
        assert errors[0] == errors[1] and errors[0][0] == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            req = pb.CreateProfileRequest(
                profile=cv.profile_to_pb(make_profile(namespace="team-a"))
            )
            stub.CreateProfile(req, timeout=30, metadata=as_("reader-token"))
        assert _info(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "NAMESPACE_FORBIDDEN")
    finally:
        channel.close()
        server.stop(0)


def test_every_table_keeps_the_namespace_of_its_rows(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample
) -> None:
    """Sample batches and samples carry their profile's namespace (a column on every
    table), read back with SQL from the store's own engine."""
    p, _ = store.create_profile(make_profile(namespace="team-a"))
    store.append_samples(p.id, "b0", [make_sample(i) for i in range(3)])
    with store._engine.connect() as conn:  # the real database, bypassing the repository
        got = {
            table: conn.execute(
                sa.text(f"SELECT DISTINCT namespace FROM {table} WHERE profile_id = :p"),
                {"p": p.id},
            )
            .scalars()
            .all()
            for table in ("samples", "sample_batches")
        }
        (own,) = (
            conn.execute(sa.text("SELECT namespace FROM profiles WHERE id = :p"), {"p": p.id})
            .scalars()
            .all()
        )
    assert got == {"samples": ["team-a"], "sample_batches": ["team-a"]} and own == "team-a"


def test_only_the_profiler_that_runs_a_profile_writes_it(
    store: Store, make_profile: MakeProfile, make_sample: MakeSample
) -> None:
    """Two operators (two profilers with their own service tokens): the one that wrote
    RUNNING runs the profile; the other may neither append nor change its state until the
    runner releases it with a QUEUED checkpoint (then it may resume it)."""
    sv: Any = StoreServicer(store)
    ctx: Any = None
    one = Principal("idealrt-profiler-1", {"*": Role.ADMIN})
    two = Principal("idealrt-profiler-2", {"*": Role.ADMIN})
    p, _ = store.create_profile(make_profile(namespace="team-a"))
    running = cv.profile_to_pb(dataclasses.replace(p, state=ProfileState.RUNNING))

    def append(batch: str) -> Any:
        return pb.AppendSamplesRequest(
            profile_id=p.id, batch_id=batch, samples=[cv.sample_to_pb(make_sample(1))]
        )

    with acting_as(one):
        sv.UpdateProfile(pb.UpdateProfileRequest(profile=running), ctx)
        assert sv.AppendSamples(append("b0"), ctx).appended == 1
    with acting_as(two):
        for call in (
            lambda: sv.AppendSamples(append("b1"), ctx),
            lambda: sv.UpdateProfile(pb.UpdateProfileRequest(profile=running), ctx),
        ):
            with pytest.raises(PermissionDenied) as info:
                call()
            assert info.value.reason == "PROFILE_RUN_ELSEWHERE"
            assert "idealrt-profiler-1" not in info.value.message
    assert store.count_samples(p.id) == 1
    queued = cv.profile_to_pb(dataclasses.replace(p, state=ProfileState.QUEUED))
    with acting_as(one):
        sv.UpdateProfile(pb.UpdateProfileRequest(profile=queued), ctx)  # checkpoint: released
    with acting_as(two):  # a restarted (other) profiler resumes it
        sv.UpdateProfile(pb.UpdateProfileRequest(profile=running), ctx)
        assert sv.AppendSamples(append("b1"), ctx).appended == 1
    with acting_as(one), pytest.raises(PermissionDenied):
        sv.AppendSamples(append("b2"), ctx)
