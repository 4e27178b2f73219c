"""launch_profile_job / watch_profile_job against stand-ins for the Kubernetes API.

No Kubernetes API server can run here, so these tests use a fake BatchV1Api and a fake
watch, and they test ONLY what those can show: the sequence of calls (and their
arguments), how API errors map to idealrt errors, and how watch events become a
JobOutcome. They say nothing about a real cluster's behaviour (scheduling, admission, the
kubelet). Where the official client is installed, two tests also drive its real
`kubernetes.watch.Watch` over a fake HTTP response, and its real ApiException.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from idealrt.clients import k8s
from idealrt.clients.k8s import (
    JobState,
    ProfileJobSpec,
    launch_profile_job,
    map_api_error,
    render_profile_job,
    watch_profile_job,
)
from idealrt.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    IdealrtError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

SPEC = ProfileJobSpec(name="prof-gpt2", model="gpt2")


class FakeApiException(Exception):
    """The shape of kubernetes.client.ApiException: status, reason, body (a JSON Status)."""

    def __init__(self, status: int, reason: str = "", body: dict[str, Any] | None = None) -> None:
        super().__init__(f"({status}) {reason}")
        self.status, self.reason = status, reason
        self.body = json.dumps(body) if body is not None else None


def job(
    rv: str, *conditions: tuple[str, str, str], active: int = 0, failed: int = 0, succeeded: int = 0
) -> dict[str, Any]:
    return {
        "metadata": {"name": SPEC.name, "resourceVersion": rv},
        "status": {
            "active": active,
            "failed": failed,
            "succeeded": succeeded,
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions
            ],
        },
    }


def listing(rv: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": rv}, "items": list(items)}


class FakeBatchApi:
    """Records every call; answers from scripted results (a value or an exception)."""

    def __init__(self, *, create: Any = None, lists: list[Any] | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._create = create
        self._lists = list(lists or [])

    def create_namespaced_job(self, namespace: str, body: Any, **kwargs: Any) -> Any:
        self.calls.append(("create", (namespace, body), kwargs))
        if isinstance(self._create, BaseException):
            raise self._create
        return self._create if self._create is not None else {"metadata": body["metadata"]}

    def list_namespaced_job(self, namespace: str, **kwargs: Any) -> Any:
        self.calls.append(("list", (namespace,), kwargs))
        result = self._lists.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


class FakeWatch:
    """One scripted stream per Watch: events (dicts) or an exception to raise mid-stream."""

    def __init__(self, script: list[Any], log: list[dict[str, Any]]) -> None:
        self._script, self._log = script, log
        self.stopped = False

    def stream(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        self._log.append({"func": func.__name__, "args": args, **kwargs})
        for item in self._script:
            if isinstance(item, BaseException):
                raise item
            if callable(item):
                item()
                continue
            yield item

    def stop(self) -> None:
        self.stopped = True


def watches(
    *scripts: list[Any],
) -> tuple[Callable[[], FakeWatch], list[dict[str, Any]], list[FakeWatch]]:
    log: list[dict[str, Any]] = []
    made: list[FakeWatch] = []
    queue = list(scripts)

    def factory() -> FakeWatch:
        w = FakeWatch(queue.pop(0), log)
        made.append(w)
        return w

    return factory, log, made


def ev(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "raw_object": obj, "object": obj}


# ------------------------------------------------------------------ launch


def test_launch_creates_the_rendered_job_strictly() -> None:
    api = FakeBatchApi()
    assert launch_profile_job(SPEC, api=api, request_timeout_s=7.0) == SPEC.name
    ((verb, (namespace, body), kwargs),) = api.calls
    assert verb == "create" and namespace == SPEC.namespace
    assert body == render_profile_job(SPEC)
    assert kwargs == {"field_validation": "Strict", "_request_timeout": 7.0}


def test_launch_returns_the_name_the_server_gave() -> None:
    api = FakeBatchApi(create={"metadata": {"name": "prof-gpt2"}, "status": {}})
    assert launch_profile_job(SPEC, api=api) == "prof-gpt2"


def test_launch_validates_before_calling_the_api() -> None:
    api = FakeBatchApi()
    with pytest.raises(InvalidArgument) as err:
        launch_profile_job(ProfileJobSpec(name="x", model="gpt2", gpus=0), api=api)
    assert err.value.field == "gpus"
    assert api.calls == []


ERRORS: list[tuple[BaseException, type[IdealrtError], str, str]] = [
    (
        FakeApiException(
            409,
            "Conflict",
            {"reason": "AlreadyExists", "message": 'jobs.batch "prof-gpt2" already exists'},
        ),
        AlreadyExists,
        "JOB_ALREADY_EXISTS",
        "name",
    ),
    (
        FakeApiException(404, "Not Found", {"message": 'namespaces "idealrt" not found'}),
        NotFound,
        "K8S_NOT_FOUND",
        "",
    ),
    (
        FakeApiException(
            403,
            "Forbidden",
            {"message": 'jobs.batch is forbidden: User "x" cannot create resource "jobs"'},
        ),
        FailedPrecondition,
        "K8S_FORBIDDEN",
        "",
    ),
    (
        FakeApiException(
            403,
            "Forbidden",
            {
                "message": 'jobs "p" is forbidden: exceeded quota: '
                "gpu, requested: requests.nvidia.com/gpu=1"
            },
        ),
        ResourceExhausted,
        "K8S_QUOTA_EXCEEDED",
        "",
    ),
    (FakeApiException(401, "Unauthorized"), FailedPrecondition, "K8S_UNAUTHORIZED", ""),
    (
        FakeApiException(
            422,
            "Unprocessable Entity",
            {
                "message": "Job.batch is invalid",
                "details": {
                    "causes": [
                        {
                            "field": "spec.template.spec.containers[0].image",
                            "reason": "FieldValueRequired",
                        }
                    ]
                },
            },
        ),
        InvalidArgument,
        "K8S_INVALID",
        "spec.template.spec.containers[0].image",
    ),
    (
        FakeApiException(400, "Bad Request", {"message": "strict decoding error: unknown field"}),
        InvalidArgument,
        "K8S_INVALID",
        "",
    ),
    (FakeApiException(429, "Too Many Requests"), Unavailable, "K8S_UNAVAILABLE", ""),
    (FakeApiException(500, "Internal Server Error"), Unavailable, "K8S_UNAVAILABLE", ""),
    (FakeApiException(503, "Service Unavailable"), Unavailable, "K8S_UNAVAILABLE", ""),
    (FakeApiException(504, "Gateway Timeout"), Unavailable, "K8S_UNAVAILABLE", ""),
    (FakeApiException(405, "Method Not Allowed"), FailedPrecondition, "K8S_REJECTED", ""),
    (ConnectionRefusedError(111, "Connection refused"), Unavailable, "K8S_UNREACHABLE", ""),
    (TimeoutError("timed out"), Unavailable, "K8S_UNREACHABLE", ""),
]


@pytest.mark.parametrize(
    ("exc", "cls", "reason", "field"),
    ERRORS,
    ids=[f"{getattr(e, 'status', type(e).__name__)}-{r}" for e, _, r, _ in ERRORS],
)
def test_launch_maps_api_errors(
    exc: BaseException, cls: type[IdealrtError], reason: str, field: str
) -> None:
    with pytest.raises(cls) as err:
        launch_profile_job(SPEC, api=FakeBatchApi(create=exc))
    assert type(err.value) is cls
    assert (err.value.reason, err.value.field) == (reason, field)
    assert err.value.__cause__ is exc


def test_urllib3_connection_errors_are_unavailable() -> None:
    urllib3 = pytest.importorskip("urllib3")
    exc = urllib3.exceptions.MaxRetryError(None, "/apis/batch/v1", "Connection refused")
    mapped = map_api_error(exc, "job idealrt/x")
    assert isinstance(mapped, Unavailable) and mapped.reason == "K8S_UNREACHABLE"


def test_other_exceptions_pass_through_unchanged() -> None:
    bug = KeyError("metadata")
    with pytest.raises(KeyError) as err:
        launch_profile_job(SPEC, api=FakeBatchApi(create=bug))
    assert err.value is bug
    assert map_api_error(NotFound("X", "y"), "job") is None


def test_the_real_api_exception_maps_like_the_fake() -> None:
    exceptions = pytest.importorskip("kubernetes.client.exceptions")
    exc = exceptions.ApiException(status=409, reason="Conflict")
    exc.body = json.dumps({"kind": "Status", "reason": "AlreadyExists", "code": 409})
    with pytest.raises(AlreadyExists):
        launch_profile_job(SPEC, api=FakeBatchApi(create=exc))


def test_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("kubernetes", "kubernetes.client", "kubernetes.config", "kubernetes.watch"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import` now raises ImportError
    with pytest.raises(FailedPrecondition) as err:
        launch_profile_job(SPEC)
    assert err.value.reason == "K8S_CLIENT_MISSING"
    assert "pip install idealrt[k8s]" in err.value.message
    with pytest.raises(FailedPrecondition):
        watch_profile_job("prof-gpt2", "idealrt", 1.0, api=FakeBatchApi())


def test_no_configuration_is_a_failed_precondition(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    kube_config = pytest.importorskip("kubernetes.config.kube_config")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    with pytest.raises(FailedPrecondition) as err:
        k8s.batch_api()
    assert err.value.reason == "K8S_CONFIG_MISSING"


# ------------------------------------------------------------------ watch


def test_watch_returns_at_once_when_already_finished() -> None:
    api = FakeBatchApi(lists=[listing("10", job("9", ("Complete", "", ""), succeeded=1))])
    factory, log, _ = watches()
    out = watch_profile_job("prof-gpt2", "idealrt", 60, api=api, watch=factory)
    assert out.state is JobState.SUCCEEDED and out.finished and out.succeeded == 1
    ((verb, (namespace,), kwargs),) = api.calls
    assert (verb, namespace, kwargs["field_selector"]) == (
        "list",
        "idealrt",
        "metadata.name=prof-gpt2",
    )
    assert log == []  # no watch opened


def test_watch_follows_events_to_failure() -> None:
    api = FakeBatchApi(lists=[listing("100", job("99", active=1))])
    factory, log, made = watches(
        [
            ev("ADDED", job("101", active=1)),
            ev("MODIFIED", job("102", ("FailureTarget", "BackoffLimitExceeded", "..."), failed=3)),
            ev(
                "MODIFIED",
                job(
                    "103",
                    ("FailureTarget", "BackoffLimitExceeded", "..."),
                    (
                        "Failed",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                    failed=3,
                ),
            ),
            ev("MODIFIED", job("104")),  # never read: the watch ends at the terminal state
        ]
    )
    out = watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=factory)
    assert out.state is JobState.FAILED and out.reason == "BackoffLimitExceeded"
    assert out.failed == 3 and "backoff limit" in out.message
    (opened,) = log
    assert opened["func"] == "list_namespaced_job" and opened["args"] == ("idealrt",)
    assert opened["resource_version"] == "100"  # continues from the list
    assert opened["field_selector"] == "metadata.name=prof-gpt2"
    assert 0 < opened["timeout_seconds"] <= 600 and isinstance(opened["timeout_seconds"], int)
    assert opened["allow_watch_bookmarks"] is True
    assert made[0].stopped


def test_watch_resumes_from_bookmarks_after_a_server_timeout() -> None:
    api = FakeBatchApi(lists=[listing("5", job("5", active=1))])
    factory, log, _ = watches(
        [ev("BOOKMARK", {"metadata": {"resourceVersion": "42"}})],  # then the server ends it
        [ev("MODIFIED", job("43", ("Complete", "", ""), succeeded=1))],
    )
    out = watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=factory)
    assert out.state is JobState.SUCCEEDED
    assert [w["resource_version"] for w in log] == ["5", "42"]
    assert [c[0] for c in api.calls] == ["list"]  # one list, then watches only


@pytest.mark.parametrize(
    "gone",
    [
        FakeApiException(410, "Expired: too old resource version"),
        ev("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}),
    ],
    ids=["raised", "event"],
)
def test_watch_lists_again_after_410_gone(gone: Any) -> None:
    api = FakeBatchApi(
        lists=[listing("5", job("5", active=1)), listing("900", job("899", active=1))]
    )
    factory, log, _ = watches([gone], [ev("MODIFIED", job("901", ("Complete", "", "")))])
    out = watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=factory)
    assert out.state is JobState.SUCCEEDED
    assert [c[0] for c in api.calls] == ["list", "list"]
    assert [w["resource_version"] for w in log] == ["5", "900"]


def test_watch_error_event_maps_like_an_exception() -> None:
    api = FakeBatchApi(lists=[listing("5", job("5", active=1))])
    factory, _, _ = watches([ev("ERROR", {"kind": "Status", "code": 500, "message": "etcd"})])
    with pytest.raises(Unavailable):
        watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=factory)


def test_watch_deleted_job_is_not_found() -> None:
    api = FakeBatchApi(lists=[listing("5", job("5", active=1))])
    factory, _, _ = watches([ev("DELETED", job("6", active=1))])
    with pytest.raises(NotFound) as err:
        watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=factory)
    assert err.value.reason == "JOB_DELETED"


def test_watch_missing_job_is_not_found() -> None:
    api = FakeBatchApi(lists=[listing("5")])
    with pytest.raises(NotFound) as err:
        watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=watches()[0])
    assert (err.value.reason, err.value.field) == ("JOB_NOT_FOUND", "name")


def test_watch_timeout_returns_the_running_state() -> None:
    api = FakeBatchApi(lists=[listing("5", job("5", active=1))])
    factory, log, _ = watches([], [], [])  # the server ends each watch with no event
    out = watch_profile_job("prof-gpt2", "idealrt", 0.05, api=api, watch=factory)
    assert out.state is JobState.RUNNING and not out.finished and out.active == 1
    assert 1 <= len(log) <= 2 and log[0]["timeout_seconds"] == 1


def test_watch_read_timeout_at_the_deadline_returns_the_running_state() -> None:
    api = FakeBatchApi(lists=[listing("5", job("5", active=1))])
    factory, _, _ = watches([lambda: time.sleep(0.03), TimeoutError("read timed out")])
    out = watch_profile_job("prof-gpt2", "idealrt", 0.01, api=api, watch=factory)
    assert out.state is JobState.RUNNING


def test_watch_connection_error_before_the_deadline_is_unavailable() -> None:
    api = FakeBatchApi(lists=[listing("5", job("5", active=1))])
    factory, _, _ = watches([ConnectionResetError(104, "reset")])
    with pytest.raises(Unavailable) as err:
        watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=factory)
    assert err.value.reason == "K8S_UNREACHABLE"


def test_watch_forbidden_list_is_a_failed_precondition() -> None:
    api = FakeBatchApi(lists=[FakeApiException(403, "Forbidden")])
    with pytest.raises(FailedPrecondition) as err:
        watch_profile_job("prof-gpt2", "idealrt", 600, api=api, watch=watches()[0])
    assert err.value.reason == "K8S_FORBIDDEN"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("Prof", "idealrt", 10.0), "name"),
        (("prof", "ns_1", 10.0), "namespace"),
        (("prof", "idealrt", 0.0), "timeout"),
        (("prof", "idealrt", -1.0), "timeout"),
    ],
)
def test_watch_validates_before_calling_the_api(args: tuple[str, str, float], field: str) -> None:
    api = FakeBatchApi()
    with pytest.raises(InvalidArgument) as err:
        watch_profile_job(*args, api=api, watch=watches()[0])
    assert err.value.field == field and api.calls == []


# ------------------------------------------------------------------ the real Watch class


class FakeHttpResponse:
    """What the client's watch reads: `stream()` chunks of newline-delimited JSON events."""

    status = 200

    def __init__(self, events: list[dict[str, Any]]) -> None:
        # a blank line between events, as keep-alives can leave (the client yields None)
        self._body = "".join(json.dumps(e) + "\n\n" for e in events).encode()
        self.closed = False

    def stream(self, amt: Any = None, decode_content: Any = None) -> Iterator[bytes]:
        yield from (self._body[i : i + 7] for i in range(0, len(self._body), 7))  # split lines

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


class HttpBatchApi(FakeBatchApi):
    """A list call answers a listing; a watch call (watch=True) a fake HTTP stream."""

    def __init__(self, lists: list[Any], streams: list[list[dict[str, Any]]]) -> None:
        super().__init__(lists=lists)
        self.streams = list(streams)

    def list_namespaced_job(self, namespace: str, **kwargs: Any) -> Any:
        if kwargs.get("watch"):
            self.calls.append(("watch", (namespace,), kwargs))
            return FakeHttpResponse(self.streams.pop(0))
        return super().list_namespaced_job(namespace, **kwargs)


def test_with_the_clients_real_watch() -> None:
    """The official Watch accepts our arguments, decodes the stream into the events we
    read, and raises a 410 ERROR (as an ApiException, since we pass timeout_seconds)."""
    pytest.importorskip("kubernetes.watch")
    api = HttpBatchApi(
        lists=[listing("5", job("5", active=1)), listing("50", job("50", active=1))],
        streams=[
            [
                {"type": "MODIFIED", "object": job("6", active=1)},
                {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "code": 410,
                        "reason": "Expired",
                        "message": "too old resource version",
                    },
                },
            ],
            [{"type": "MODIFIED", "object": job("51", ("Complete", "", ""), succeeded=1)}],
        ],
    )
    out = watch_profile_job("prof-gpt2", "idealrt", 600, api=api)
    assert out.state is JobState.SUCCEEDED and out.succeeded == 1
    assert [c[0] for c in api.calls] == ["list", "watch", "list", "watch"]
    first_watch = api.calls[1][2]
    assert first_watch["watch"] is True and first_watch["_preload_content"] is False
    assert first_watch["resource_version"] == "5"
    assert api.calls[3][2]["resource_version"] == "50"
