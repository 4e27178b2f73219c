"""Namespaces: every stored object (profile, its samples, cost model) belongs to one.

A namespace is a DNS label (RFC 1123, as Kubernetes namespaces are): 1-63 characters of
lowercase letters, digits and '-', starting and ending with a letter or digit. At the API
boundary an empty namespace means DEFAULT_NAMESPACE, so clients that predate namespaces
keep working in "default".

A *visibility set* (`frozenset[str] | None`) says which namespaces a call may touch: None is
every namespace (no restriction), an empty set is none at all. `check_namespace_filter`
turns a request's repeated filter into one (empty filter: None) and `intersect` narrows one
by another (a request's filter by what its caller may read).

Not in `idealrt.core.domain` because the checks raise `idealrt.core.errors`, which imports
grpc, and the domain dataclasses stay free of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from idealrt.core.auth import ALL_NAMESPACES, Role, current_principal
from idealrt.core.domain import DEFAULT_NAMESPACE, CostModel, Profile
from idealrt.core.errors import NotFound, invalid
from idealrt.core.reasons import COST_MODEL_NOT_FOUND, NAMESPACE_INVALID, PROFILE_NOT_FOUND

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_FILTER_NAMESPACES",
    "NAMESPACE_MAX_LEN",
    "NAMESPACE_RULE",
    "check_namespace",
    "check_namespace_filter",
    "intersect",
]

NAMESPACE_MAX_LEN = 63
NAMESPACE_RULE = (
    "a DNS label: 1-63 characters of lowercase letters, digits and '-', starting and ending "
    "with a letter or digit (^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$)"
)
# A filter naming more namespaces than this is refused (a caller's list, not a scan).
MAX_FILTER_NAMESPACES = 256
_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def check_namespace(value: object, field: str) -> str:
    """`value` as a namespace: "" is DEFAULT_NAMESPACE; anything that is not a DNS label is
    InvalidArgument(NAMESPACE_INVALID) naming `field` and the rule."""
    if not isinstance(value, str):
        raise invalid(
            field,
            NAMESPACE_INVALID,
            f"{field} must be a string ({NAMESPACE_RULE}), got {type(value).__name__}",
        )
    if value == "":
        return DEFAULT_NAMESPACE
    if not _NAMESPACE_RE.fullmatch(value):
        raise invalid(
            field, NAMESPACE_INVALID, f"{field} must be {NAMESPACE_RULE}; got {value[:80]!r}"
        )
    return value


def check_namespace_filter(values: Iterable[object], field: str) -> frozenset[str] | None:
    """A request's namespace filter as a visibility set: no entries is None (every
    namespace); each entry is checked as by `check_namespace` ("" is "default"), and more
    than MAX_FILTER_NAMESPACES entries is InvalidArgument naming `field`."""
    if isinstance(values, str | bytes):  # a lone string is not a filter of its characters
        raise invalid(field, NAMESPACE_INVALID, f"{field} must be a list of namespaces")
    items = list(values)
    if not items:
        return None
    if len(items) > MAX_FILTER_NAMESPACES:
        raise invalid(
            field,
            NAMESPACE_INVALID,
            f"{field} names {len(items)} namespaces; at most {MAX_FILTER_NAMESPACES} are allowed",
        )
    return frozenset(check_namespace(v, f"{field}[{i}]") for i, v in enumerate(items))


def intersect(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """The namespaces in both visibility sets (None is every namespace)."""
    if a is None:
        return b
    if b is None:
        return a
    return a & b


# ------------------------------------------------------------ visibility of stored objects
#
# The domain of every service decides with these what the current RPC's principal
# (core/auth.py) may see and change: an object in a namespace the caller cannot read is
# NOT_FOUND with exactly the error of a missing id (the store's own, from the same
# constructors), so its existence never leaks; a reader who tries to change it gets
# PERMISSION_DENIED (Principal.require).


def profile_not_found(profile_id: str, field: str = "id") -> NotFound:
    """The one "no such profile" error (the store's, and every service's for a profile
    the caller may not see)."""
    return NotFound(PROFILE_NOT_FOUND, f"no profile with id {profile_id!r}", field=field)


def cost_model_not_found(cm_id: str, field: str = "id") -> NotFound:
    """The one "no such cost model" error (see profile_not_found)."""
    return NotFound(COST_MODEL_NOT_FOUND, f"no cost model with id {cm_id!r}", field=field)


def readable() -> frozenset[str] | None:
    """The namespaces the current principal may read (None: every one)."""
    return current_principal().namespaces(Role.READER)


def may_read(namespace: str) -> bool:
    role = current_principal().role_in(namespace)
    return role is not None and role >= Role.READER


def visible_profile(profile: Profile, field: str = "id") -> Profile:
    """`profile`, or NOT_FOUND as if it did not exist when the caller may not read it."""
    if not may_read(profile.namespace):
        raise profile_not_found(profile.id, field)
    return profile


def visible_cost_model(cm: CostModel, field: str = "id") -> CostModel:
    """`cm`, or NOT_FOUND as if it did not exist when the caller may not read it."""
    if not may_read(cm.namespace):
        raise cost_model_not_found(cm.id, field)
    return cm


def require_writer(namespace: str) -> None:
    """PERMISSION_DENIED unless the current principal may write in `namespace`."""
    current_principal().require(namespace, Role.WRITER)


def require_operator() -> None:
    """PERMISSION_DENIED unless the current principal is an admin of every namespace
    ("*"): the suite's own services (their service tokens) and its operators. Serving's
    LoadModel, UnloadModel and Generate act on devices and models that every namespace
    shares, so no team's role is enough for them; the profiler calls them for the teams."""
    current_principal().require(ALL_NAMESPACES, Role.ADMIN)
