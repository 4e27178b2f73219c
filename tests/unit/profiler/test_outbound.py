"""The outbound policy: which hosts a namespace's HTTP targets may reach and which
credential may be sent where (services/profiler/outbound.py).

Real parts: TOML parsing, real HTTP servers on 127.0.0.1 (tests/fixtures' OpenAI-compatible
fake and a bare "attacker" that records every request it gets), httpx's real connection
pool with the checked network backend. Name resolution is replaced (`resolve=`) where a
test needs a host name to resolve to a chosen address: no DNS server can be told to here.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idealrt.core.domain import ModelRef, Profile, ProfilePlan, StackSpec, Target, TargetKind
from idealrt.core.errors import InvalidArgument, PermissionDenied
from idealrt.services.profiler.http_target import HttpOptions, HttpTarget
from idealrt.services.profiler.outbound import Credential, OutboundPolicy, parse_base_url


class Attacker:
    """An HTTP server that answers 200 to anything and records the requests' headers."""

    def __init__(self) -> None:
        seen: list[dict[str, str]] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                seen.append(dict(self.headers))
                body = b'{"data": []}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    a = Attacker()
    try:
        yield a
    finally:
        a.close()


def _profile(**target: Any) -> Profile:
    return Profile(
        id="p1",
        model=ModelRef(name="api"),
        stack=StackSpec(),
        plan=ProfilePlan(prompt_tokens=(8,), output_tokens=(2,)),
        target=Target(kind=TargetKind.HTTP, api_model="m", **target),
    )


POLICY_TOML = """
[credentials.openai]
namespaces = ["default"]
base_urls = ["https://api.openai.com/v1"]
key_file = "{key_file}"

[credentials.local]
namespaces = ["team-b"]
base_urls = ["http://127.0.0.1:{port}/v1"]
env = "IDEALRT_TEST_LOCAL_KEY"

[hosts]
default = ["api.openai.com", "*.example.com"]

[private_hosts]
default = ["127.0.0.1:{port}"]
team-b = ["127.0.0.1:{port}"]
"""


def _policy(tmp_path: Path, port: int, **kw: Any) -> OutboundPolicy:
    key = tmp_path / "openai-key"
    key.write_text("sk-server-secret")
    p = OutboundPolicy.from_toml(POLICY_TOML.format(key_file=key, port=port))
    return OutboundPolicy(p.credentials, p.hosts, p.private_hosts, **kw)


def _public(host: str, port: int) -> list[str]:
    return ["93.184.216.34"]


# ---------------------------------------------------------------- parsing


def test_the_file_parses_and_bad_files_are_refused_naming_the_problem(tmp_path: Path) -> None:
    p = _policy(tmp_path, 8000)
    assert set(p.credentials) == {"openai", "local"}
    assert p.credentials["local"].env == "IDEALRT_TEST_LOCAL_KEY"
    bad = {
        "[credentials.x]\nnamespaces=['a']\nbase_urls=['https://h/v1']\n": "exactly one of",
        "[credentials.x]\nnamespaces=['a']\nbase_urls=['ftp://h']\nenv='K'\n": "http(s) URL",
        "[hosts]\ndefault = 'api.openai.com'\n": "list of non-empty strings",
        "[hosts]\ndefault = ['h:notaport']\n": "is not a host",
        "[outbound]\n": "unknown tables",
        "[credentials.x]\nnamespaces=['a']\nbase_urls=['https://h']\nenv='K'\nkey='k'\n": "unknown",
    }
    for text, says in bad.items():
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            OutboundPolicy.from_toml(text)
    path = tmp_path / "outbound.toml"
    path.write_text("not = [toml")
    with pytest.raises(ValueError, match=str(path)):
        OutboundPolicy.load(path)
    assert OutboundPolicy.load(None).hosts == {}


def test_base_urls_with_userinfo_are_refused_without_echoing_them() -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_base_url("https://alice:hunter2@api.openai.com/v1")
    assert e.value.reason == "BASE_URL_USERINFO" and e.value.field == "profile.target.base_url"
    assert "hunter2" not in str(e.value) and "alice" not in str(e.value)
    for url in ("ftp://h/v1", "http:///v1", "not a url"):
        with pytest.raises(InvalidArgument) as e:
            parse_base_url(url)
        assert e.value.reason == "BASE_URL_INVALID"


# ---------------------------------------------------------------- hosts and addresses


def test_hosts_match_names_ports_and_suffix_wildcards(tmp_path: Path) -> None:
    p = _policy(tmp_path, 8000, resolve=_public)
    assert p.check_url("default", "https://api.openai.com/v1").host == "api.openai.com"
    p.check_url("default", "https://eu.example.com/v1")
    p.check_url("default", "http://127.0.0.1:8000/v1")  # a private host, listed as such
    for ns, url in [
        ("default", "https://example.com/v1"),  # *.example.com: subdomains only
        ("default", "https://evil-example.com/v1"),
        ("default", "http://127.0.0.1:8001/v1"),  # another port
        ("default", "http://localhost:8000/v1"),  # another name for it: not listed
        ("team-b", "https://api.openai.com/v1"),  # another namespace's host
        ("nobody", "http://127.0.0.1:8000/v1"),
    ]:
        with pytest.raises(PermissionDenied) as e:
            p.check_url(ns, url)
        assert e.value.reason == "OUTBOUND_HOST_NOT_ALLOWED", url


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.9",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
    ],
)
def test_a_public_host_that_resolves_to_a_non_global_address_is_refused(
    tmp_path: Path, address: str
) -> None:
    p = _policy(tmp_path, 8000, resolve=lambda h, port: ["93.184.216.34", address])
    with pytest.raises(PermissionDenied) as e:
        p.check_url("default", "https://api.openai.com/v1")
    assert e.value.reason == "OUTBOUND_ADDRESS_NOT_ALLOWED" and address in str(e.value)


def test_the_address_is_checked_again_at_connect_time(tmp_path: Path, attacker: Attacker) -> None:
    """DNS that answers a public address at create time and loopback later (rebinding):
    the connection is refused by the checked backend before anything is sent."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])
    policy = OutboundPolicy(
        hosts={"default": (f"api.example.com:{attacker.port}",)},
        resolve=lambda host, port: next(answers),
    )
    target = HttpTarget.from_profile(
        _profile(base_url=f"http://api.example.com:{attacker.port}/v1", tokenizer="x"),
        policy,
    )
    try:
        with pytest.raises(PermissionDenied) as e:
            target._http().get(f"http://api.example.com:{attacker.port}/v1/models")
        assert e.value.reason == "OUTBOUND_ADDRESS_NOT_ALLOWED"
    finally:
        target.close()
    assert attacker.seen == []


def test_a_checked_connection_reaches_an_allowed_private_host(
    tmp_path: Path, attacker: Attacker
) -> None:
    """The checked backend connects to the address it checked (real loopback server)."""
    policy = _policy(tmp_path, attacker.port)
    target = HttpTarget.from_profile(
        _profile(base_url=attacker.base_url, tokenizer="x"),
        policy,
    )
    target.options = HttpOptions(trust_env=False)
    try:
        resp = target._http().get(f"{attacker.base_url}/models")
        assert resp.status_code == 200
    finally:
        target.close()
    assert len(attacker.seen) == 1 and "Authorization" not in attacker.seen[0]


# ---------------------------------------------------------------- credentials


def test_a_credential_goes_only_where_it_is_bound_and_errors_do_not_tell_which_exist(
    tmp_path: Path, attacker: Attacker
) -> None:
    p = _policy(tmp_path, attacker.port, resolve=_public)
    url = p.check_url("default", "https://api.openai.com/v1/")
    assert p.credential("default", "openai", url).read() == "sk-server-secret"
    messages = set()
    for ns, cid, base in [
        ("default", "no-such-credential", "https://api.openai.com/v1"),
        ("default", "local", attacker.base_url),  # exists, another namespace's
        ("default", "openai", "https://eu.example.com/v1"),  # exists, not bound to this URL
        ("default", "openai", "https://api.openai.com/v2"),  # another path
    ]:
        with pytest.raises(PermissionDenied) as e:
            p.credential(ns, cid, parse_base_url(base))
        assert e.value.reason == "CREDENTIAL_NOT_AVAILABLE"
        assert e.value.field == "profile.target.credential"
        messages.add(str(e.value).replace(repr(cid), "<id>"))
    assert len(messages) == 1  # one answer, whatever the reason


def test_a_caller_cannot_send_a_server_credential_to_its_own_url(
    tmp_path: Path, attacker: Attacker
) -> None:
    """The exfiltration of issue 13 (the server's secret sent to the caller's URL): the
    credential bound to api.openai.com is refused for the attacker's URL, even where the
    attacker's host is allowed, and the attacker gets no request."""
    p = _policy(tmp_path, attacker.port)
    with pytest.raises(PermissionDenied) as e:
        HttpTarget.from_profile(
            _profile(base_url=attacker.base_url, tokenizer="x", credential="openai"), p
        )
    assert e.value.reason == "CREDENTIAL_NOT_AVAILABLE"
    assert attacker.seen == []


def test_credentials_from_an_operator_named_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Credential(id="k", namespaces=frozenset({"a"}), base_urls=("http://h/v1",), env="X_KEY")
    monkeypatch.setenv("X_KEY", "sk-env")
    assert c.read() == "sk-env"
    monkeypatch.delenv("X_KEY")
    with pytest.raises(Exception) as e:
        c.read()
    assert "X_KEY" not in str(e.value)  # the variable's name is the operator's
