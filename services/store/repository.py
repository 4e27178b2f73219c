"""The store: idealrt's system of record for profiles, samples and cost models.

`open_store(url)` parses the URL (see `url`), opens one engine and applies migrations
(see `schema`). `Store` is thread-safe; every method is one short transaction, validated
before it writes and rolled back on any error, so bad input never corrupts stored data.

Idempotency: creates carry a client `request_id` (a replay returns the stored row and
created=False; the same request_id with a different body is AlreadyExists
REQUEST_ID_REUSED); sample appends carry a `batch_id` per profile (a replay returns the
batch's count and writes nothing; a different body is AlreadyExists BATCH_ID_REUSED).

Write serialization: SQLite writes begin IMMEDIATE (its one writer lock, taken up front) and
an in-process lock spares threads SQLite's busy-wait; on PostgreSQL an append locks its
profile row (SELECT ... FOR UPDATE), so sequence numbers stay contiguous under concurrency.
The in-memory SQLite database lives in one connection, so there every call is serialized.
Database connection failures surface as Unavailable STORE_UNAVAILABLE.

Pages (AIP-158): page_size 0 means the default; larger than the maximum is coerced to the
maximum; negative is InvalidArgument. Profiles and cost models list newest first
(create_time, id descending); samples in seq order.

Namespaces: a profile or cost model is created in its `namespace` and stays there; its
samples belong to it. Reads (get, list, samples, counts) and the lookups of writes (update,
append, a cost model's profile) take `namespaces`, a visibility set (None: every namespace,
as before namespaces existed; an empty set: none): an object outside it is NOT_FOUND exactly
as if it did not exist (same reason, message and field), and lists are filtered. An update
never moves an object: the stored namespace wins and the namespace in the request is
ignored (a client that predates namespaces sends "default" for everything). A cost model
that names a profile must be in the profile's namespace (InvalidArgument NAMESPACE_MISMATCH).
Authorization is the caller's: which set to pass, and whether it may write in a namespace.
Ids and request ids are unique store-wide, not per namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from idealrt.core import paging
from idealrt.core.clock import utcnow
from idealrt.core.domain import CostModel, Profile, ProfileState, Sample
from idealrt.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    invalid,
)
from idealrt.core.reasons import PROFILE_TERMINAL
from idealrt.services.store import _queries, _rows, _serde, _validate
from idealrt.services.store._dberrors import unavailable_on_db_error
from idealrt.services.store.reasons import (
    BATCH_ID_INVALID,
    COST_MODEL_ALREADY_EXISTS,
    NAMESPACE_MISMATCH,
    PROFILE_ALREADY_EXISTS,
    PROFILE_RUN_ELSEWHERE,
    STORE_CLOSED,
)
from idealrt.services.store.schema import cost_models, migrate, profiles, sample_batches, samples
from idealrt.services.store.url import (
    SQLITE_BEGIN_OPTION,
    StoreUrl,
    create_store_engine,
    parse_store_url,
)

__all__ = [
    "PROFILE_PAGE",
    "SAMPLE_PAGE",
    "PageLimits",
    "Store",
    "open_store",
]

# (default, maximum) page sizes
PROFILE_PAGE = (50, 1000)
SAMPLE_PAGE = (1000, 10000)


@dataclasses.dataclass(frozen=True)
class PageLimits:
    """The largest page a list returns: of profiles and cost models, of samples (a larger
    page_size is coerced to it, AIP-158, before any query)."""

    objects: int = PROFILE_PAGE[1]
    samples: int = SAMPLE_PAGE[1]


_UNFINISHED = (ProfileState.QUEUED.value, ProfileState.RUNNING.value)
Namespaces = frozenset[str] | None  # a visibility set: None is every namespace


def open_store(url: str, *, page_limits: PageLimits | None = None) -> Store:
    """Open (creating and migrating as needed) the store at `url`; `page_limits`: the
    largest pages its lists return (StoreConfig: IDEALRT_MAX_PAGE_SIZE,
    IDEALRT_MAX_SAMPLE_PAGE_SIZE)."""
    parsed = parse_store_url(url)
    engine = create_store_engine(parsed)
    try:
        with unavailable_on_db_error(parsed):
            migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, parsed, page_limits or PageLimits())


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def _listing_filter(base: str, namespaces: Namespaces) -> str:
    """A page token's filter: `base` alone for every namespace (tokens issued before
    namespaces stay valid), else `base` and a short digest of the set (a set of many
    63-character names would not fit a token)."""
    if namespaces is None:
        return base
    return f"{base}|ns:{_serde.digest(sorted(namespaces))[:16]}"


class Store:
    """See the module docstring. Construct with `open_store`."""

    def __init__(
        self, engine: Engine, parsed: StoreUrl, page_limits: PageLimits | None = None
    ) -> None:
        limits = page_limits or PageLimits()
        # (default, maximum) page sizes of the lists: profiles and cost models, samples
        self._object_page = (min(PROFILE_PAGE[0], limits.objects), limits.objects)
        self._sample_page = (min(SAMPLE_PAGE[0], limits.samples), limits.samples)
        self._engine = engine
        self._parsed = parsed
        self._write_engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        sqlite = parsed.backend == "sqlite"
        self._all_lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if parsed.memory else contextlib.nullcontext()
        )
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if sqlite and not parsed.memory else contextlib.nullcontext()
        )
        self._closed = False

    @property
    def url(self) -> str:
        """The store URL, password masked."""
        return self._parsed.redacted()

    @property
    def backend(self) -> str:
        return self._parsed.backend

    def close(self) -> None:
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[sa.Connection]:
        if self._closed:
            raise FailedPrecondition(STORE_CLOSED, "the store has been closed")
        engine = self._write_engine if write else self._engine
        with (
            self._all_lock,
            self._write_lock if write else contextlib.nullcontext(),
            unavailable_on_db_error(self._parsed),
            engine.begin() as conn,
        ):
            yield conn

    # ---- profiles ----------------------------------------------------------------------

    def create_profile(self, profile: Profile) -> tuple[Profile, bool]:
        """Store a new profile; returns (stored, created). Idempotent on request_id."""
        p = _validate.check_profile(profile)
        p = dataclasses.replace(p, id=p.id or _new_id("prof"), create_time=utcnow())
        try:
            with self._tx(write=True) as conn:
                if p.request_id and (existing := _queries.profile_by_request(conn, p)):
                    return existing, False
                conn.execute(profiles.insert().values(_rows.profile_row(p, update_time=utcnow())))
                return _queries.get_profile(conn, p.id, "id"), True
        except IntegrityError:  # lost a race on request_id, or the id is taken
            with self._tx(write=False) as conn:
                if p.request_id and (existing := _queries.profile_by_request(conn, p)):
                    return existing, False
            raise AlreadyExists(
                PROFILE_ALREADY_EXISTS, f"a profile with id {p.id!r} exists", field="id"
            ) from None

    def get_profile(
        self, profile_id: str, namespaces: Namespaces = None, *, field: str = "id"
    ) -> Profile:
        """`field` names the id in errors (a caller looking up the profile of another
        request's `profile_id` passes "profile_id")."""
        _validate.check_id(profile_id, field)
        ns = _validate.check_namespaces(namespaces)
        with self._tx(write=False) as conn:
            return _queries.get_profile(conn, profile_id, field, namespaces=ns)

    def update_profile(
        self, profile: Profile, namespaces: Namespaces = None, *, writer: str | None = None
    ) -> Profile:
        """Write the mutable fields (state, counters, start/end time, error, provenance,
        model_spec); model/stack/plan/target/request_id/create_time/namespace are kept as
        stored. A terminal profile is final: only an identical update (a retry) is
        accepted. A profile outside `namespaces` is NOT_FOUND. `writer` (the caller's
        subject, from the servicer): a profile being run by another writer is
        PERMISSION_DENIED; writing RUNNING claims the profile for `writer`, writing QUEUED
        (a checkpoint) releases it, so another profiler may resume it."""
        p = _validate.check_profile(profile)
        _validate.check_id(p.id, "id")
        ns = _validate.check_namespaces(namespaces)
        with self._tx(write=True) as conn:
            current = _queries.get_profile(conn, p.id, "id", lock=True, namespaces=ns)
            runner = self._check_runner(conn, p.id, writer)
            updated = dataclasses.replace(
                current,
                state=p.state,
                completed_samples=p.completed_samples,
                total_samples=p.total_samples,
                start_time=p.start_time,
                end_time=p.end_time,
                error=p.error,
                provenance=p.provenance,
                model_spec=p.model_spec,
            )
            if current.state.terminal:
                if _queries.mutable(updated) == _queries.mutable(current):
                    return current
                raise FailedPrecondition(
                    PROFILE_TERMINAL,
                    f"profile {p.id} is {current.state.value}; a finished profile cannot change",
                    field="state",
                )
            row = _rows.profile_row(updated, update_time=utcnow())
            del row["id"], row["request_id"], row["create_time"], row["namespace"]
            if writer is not None and p.state == ProfileState.RUNNING:
                row["runner"] = writer
            elif writer is not None and p.state == ProfileState.QUEUED:
                row["runner"] = ""
            else:
                row["runner"] = runner
            conn.execute(profiles.update().where(profiles.c.id == p.id).values(row))
            return _queries.get_profile(conn, p.id, "id")

    @staticmethod
    def _check_runner(conn: sa.Connection, profile_id: str, writer: str | None) -> str:
        """The profile's runner; PERMISSION_DENIED when `writer` is given and another
        subject runs it (the runner's name is not told: it is another team's business)."""
        runner = conn.execute(
            sa.select(profiles.c.runner).where(profiles.c.id == profile_id)
        ).scalar_one()
        if writer is not None and runner and runner != writer:
            raise PermissionDenied(
                PROFILE_RUN_ELSEWHERE,
                f"profile {profile_id} is being run by another profiler; only the profiler "
                "that runs a profile writes its samples and state",
                field="profile_id",
            )
        return str(runner)

    def list_profiles(
        self,
        page_size: int,
        page_token: str,
        state: ProfileState | None = None,
        namespaces: Namespaces = None,
    ) -> tuple[list[Profile], str]:
        """Newest first, only those in `namespaces`. Returns (profiles, next_page_token);
        "" when there are no more."""
        size = paging.page_size(page_size, *self._object_page)
        ns = _validate.check_namespaces(namespaces)
        state_filt = "" if state is None else _validate.check_state(state).value
        query = sa.select(profiles).where(_queries.visible(profiles.c.namespace, ns))
        if state is not None:
            query = query.where(profiles.c.state == state_filt)
        filt = _listing_filter(state_filt, ns)
        return self._newest_first(
            profiles, query, size, page_token, "profiles", filt, _rows.profile_from_row
        )

    def unfinished_profiles(self, namespaces: Namespaces = None) -> list[Profile]:
        """QUEUED and RUNNING profiles, oldest first (to resume at profiler start-up)."""
        ns = _validate.check_namespaces(namespaces)
        query = (
            sa.select(profiles)
            .where(profiles.c.state.in_(_UNFINISHED), _queries.visible(profiles.c.namespace, ns))
            .order_by(profiles.c.create_time, profiles.c.id)
        )
        with self._tx(write=False) as conn:
            return [_rows.profile_from_row(r) for r in conn.execute(query).mappings()]

    def _newest_first(
        self,
        table: sa.Table,
        query: sa.Select[Any],
        size: int,
        page_token: str,
        kind: str,
        filt: str,
        convert: Any,
    ) -> tuple[list[Any], str]:
        cursor = paging.decode_token(page_token, kind, filt)
        ct, tid = table.c.create_time, table.c.id
        if cursor is not None:
            try:
                after_time = _serde.from_jsonable(datetime, cursor[0])
                after_id = _validate.check_id(cursor[1], "page_token")
            # OverflowError: a time that leaves years 1..9999 when converted to UTC
            except (TypeError, ValueError, OverflowError, IndexError, InvalidArgument):
                raise paging.invalid_token() from None
            query = query.where(sa.or_(ct < after_time, sa.and_(ct == after_time, tid < after_id)))
        query = query.order_by(ct.desc(), tid.desc()).limit(size + 1)
        with self._tx(write=False) as conn:
            rows = list(conn.execute(query).mappings())
        items = [convert(r) for r in rows[:size]]
        if len(rows) <= size:
            return items, ""
        last = rows[size - 1]
        return items, paging.encode_token(
            kind, filt, [_serde.to_jsonable(last["create_time"]), last["id"]]
        )

    # ---- samples -----------------------------------------------------------------------

    def append_samples(
        self,
        profile_id: str,
        batch_id: str,
        samples_: Sequence[Sample],
        namespaces: Namespaces = None,
        *,
        writer: str | None = None,
    ) -> int:
        """Append a batch atomically, assigning contiguous seq numbers; returns its size.
        Idempotent on (profile_id, batch_id). A finished profile takes no new batches; one
        outside `namespaces` is NOT_FOUND; one run by another `writer` than the caller's
        subject is PERMISSION_DENIED (see update_profile)."""
        _validate.check_id(profile_id, "profile_id")
        _validate.check_request_id(batch_id, "batch_id", allow_empty=False, reason=BATCH_ID_INVALID)
        batch = _validate.check_samples(samples_)
        ns = _validate.check_namespaces(namespaces)
        with self._tx(write=True) as conn:
            profile = _queries.get_profile(conn, profile_id, "profile_id", lock=True, namespaces=ns)
            self._check_runner(conn, profile_id, writer)
            prior = conn.execute(
                sa.select(sample_batches.c.first_seq, sample_batches.c.count).where(
                    sample_batches.c.profile_id == profile_id,
                    sample_batches.c.batch_id == batch_id,
                )
            ).first()
            if prior is not None:
                _queries.check_replay(conn, profile_id, batch_id, prior[0], prior[1], batch)
                return int(prior[1])
            if profile.state.terminal:
                raise FailedPrecondition(
                    PROFILE_TERMINAL,
                    f"profile {profile_id} is {profile.state.value}; it takes no new samples",
                    field="profile_id",
                )
            first = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(samples.c.seq) + 1, 0)).where(
                    samples.c.profile_id == profile_id
                )
            ).scalar_one()
            conn.execute(
                sample_batches.insert().values(
                    profile_id=profile_id,
                    batch_id=batch_id,
                    first_seq=first,
                    count=len(batch),
                    create_time=utcnow(),
                    namespace=profile.namespace,
                )
            )
            if batch:
                conn.execute(
                    samples.insert(),
                    [
                        {
                            **_rows.sample_row(
                                s, profile_id=profile_id, batch_id=batch_id, seq=first + i
                            ),
                            "namespace": profile.namespace,
                        }
                        for i, s in enumerate(batch)
                    ],
                )
            return len(batch)

    def list_samples(
        self, profile_id: str, page_size: int, page_token: str, namespaces: Namespaces = None
    ) -> tuple[list[Sample], str]:
        """In seq order. Returns (samples, next_page_token); "" when there are no more. A
        profile outside `namespaces` is NOT_FOUND."""
        _validate.check_id(profile_id, "profile_id")
        ns = _validate.check_namespaces(namespaces)
        size = paging.page_size(page_size, *self._sample_page)
        cursor = paging.decode_token(page_token, "samples", profile_id)
        query = sa.select(samples).where(samples.c.profile_id == profile_id)
        if cursor is not None:
            query = query.where(samples.c.seq > _validate.check_seq_cursor(cursor))
        with self._tx(write=False) as conn:
            _queries.get_profile(conn, profile_id, "profile_id", namespaces=ns)
            rows = list(conn.execute(query.order_by(samples.c.seq).limit(size + 1)).mappings())
        items = [_rows.sample_from_row(r) for r in rows[:size]]
        if len(rows) <= size:
            return items, ""
        return items, paging.encode_token("samples", profile_id, [items[-1].seq])

    def all_samples(self, profile_id: str, namespaces: Namespaces = None) -> list[Sample]:
        """Every sample of the profile, in seq order."""
        _validate.check_id(profile_id, "profile_id")
        ns = _validate.check_namespaces(namespaces)
        query = sa.select(samples).where(samples.c.profile_id == profile_id)
        with self._tx(write=False) as conn:
            _queries.get_profile(conn, profile_id, "profile_id", namespaces=ns)
            rows = conn.execute(query.order_by(samples.c.seq)).mappings()
            return [_rows.sample_from_row(r) for r in rows]

    def count_samples(self, profile_id: str, namespaces: Namespaces = None) -> int:
        _validate.check_id(profile_id, "profile_id")
        ns = _validate.check_namespaces(namespaces)
        query = sa.select(sa.func.count()).where(samples.c.profile_id == profile_id)
        with self._tx(write=False) as conn:
            _queries.get_profile(conn, profile_id, "profile_id", namespaces=ns)
            return int(conn.execute(query).scalar_one())

    # ---- cost models -------------------------------------------------------------------

    def create_cost_model(
        self, cost_model: CostModel, namespaces: Namespaces = None
    ) -> tuple[CostModel, bool]:
        """Store a fitted cost model; returns (stored, created). Idempotent on request_id.
        A non-empty profile_id must name a stored profile in `namespaces` (else NOT_FOUND),
        and the cost model must be in that profile's namespace (else NAMESPACE_MISMATCH)."""
        cm = _validate.check_cost_model(cost_model)
        ns = _validate.check_namespaces(namespaces)
        cm = dataclasses.replace(cm, id=cm.id or _new_id("cm"), create_time=utcnow())
        try:
            with self._tx(write=True) as conn:
                if cm.request_id and (existing := _queries.cost_model_by_request(conn, cm)):
                    return existing, False
                if cm.profile_id:
                    profile = _queries.get_profile(conn, cm.profile_id, "profile_id", namespaces=ns)
                    if profile.namespace != cm.namespace:
                        raise invalid(
                            "namespace",
                            NAMESPACE_MISMATCH,
                            f"a cost model's namespace must be its profile's: profile "
                            f"{cm.profile_id} is in namespace {profile.namespace!r}, the cost "
                            f"model in {cm.namespace!r}",
                        )
                conn.execute(cost_models.insert().values(_rows.cost_model_row(cm)))
                return _queries.get_cost_model(conn, cm.id), True
        except IntegrityError:
            with self._tx(write=False) as conn:
                if cm.request_id and (existing := _queries.cost_model_by_request(conn, cm)):
                    return existing, False
            raise AlreadyExists(
                COST_MODEL_ALREADY_EXISTS, f"a cost model with id {cm.id!r} exists", field="id"
            ) from None

    def get_cost_model(self, cost_model_id: str, namespaces: Namespaces = None) -> CostModel:
        _validate.check_id(cost_model_id, "id")
        ns = _validate.check_namespaces(namespaces)
        with self._tx(write=False) as conn:
            return _queries.get_cost_model(conn, cost_model_id, ns)

    def list_cost_models(
        self,
        page_size: int,
        page_token: str,
        profile_id: str = "",
        namespaces: Namespaces = None,
    ) -> tuple[list[CostModel], str]:
        """Newest first, only those in `namespaces`, optionally only those fitted to
        `profile_id` (a profile outside `namespaces` simply lists nothing)."""
        _validate.check_id(profile_id, "profile_id", allow_empty=True)
        ns = _validate.check_namespaces(namespaces)
        size = paging.page_size(page_size, *self._object_page)
        query = sa.select(cost_models).where(_queries.visible(cost_models.c.namespace, ns))
        if profile_id:
            query = query.where(cost_models.c.profile_id == profile_id)
        return self._newest_first(
            cost_models, query, size, page_token, "cost_models",
            _listing_filter(profile_id, ns), _rows.cost_model_from_row,
        )  # fmt: skip
