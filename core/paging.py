"""Page sizes and opaque page tokens for every List call (AIP-158): the store's listings
and the serving registry's loaded models share this one format.

A token is url-safe base64 of a small JSON object: a format version, the listing it belongs
to (kind and filter) and the keyset cursor (the last item's sort key). Keyset, not offset,
so a page never repeats or skips an item that existed when listing began, whatever is
inserted meanwhile. A token from another listing, another filter or garbage is
InvalidArgument(PAGE_TOKEN_INVALID, field page_token).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from idealrt.core.errors import InvalidArgument
from idealrt.core.reasons import PAGE_SIZE_INVALID, PAGE_TOKEN_INVALID

__all__ = ["decode_token", "encode_token", "invalid_token", "page_size"]

_VERSION = 1
MAX_TOKEN_LEN = 512  # characters; the tokens issued here are at most ~300


def page_size(requested: object, default: int, maximum: int) -> int:
    """0 -> default; above the maximum -> the maximum (AIP-158 coerces, it does not
    refuse); negative or not an int -> InvalidArgument(page_size)."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise InvalidArgument(
            PAGE_SIZE_INVALID,
            f"page_size must be an integer >= 0 (0 means {default}, at most {maximum}), "
            f"got {requested!r}",
            field="page_size",
        )
    if requested == 0:
        return default
    return min(requested, maximum)


def encode_token(kind: str, filt: str, cursor: list[Any]) -> str:
    raw = json.dumps({"v": _VERSION, "k": kind, "f": filt, "c": cursor}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def invalid_token(
    message: str = "page_token is not a token this service issued",
) -> InvalidArgument:
    return InvalidArgument(PAGE_TOKEN_INVALID, message, field="page_token")


def decode_token(token: object, kind: str, filt: str) -> list[Any] | None:
    """The cursor of `token` (None for the first page, token "")."""
    if not isinstance(token, str):
        raise invalid_token("page_token must be a string")
    if token == "":
        return None
    if len(token) > MAX_TOKEN_LEN:  # refused before decoding: no token we issue is longer
        raise invalid_token()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
    except (binascii.Error, ValueError):
        raise invalid_token() from None
    if (
        not isinstance(body, dict)
        or body.get("v") != _VERSION
        or not isinstance(body.get("c"), list)
    ):
        raise invalid_token()
    if body.get("k") != kind or body.get("f") != filt:
        raise invalid_token(
            "page_token belongs to a different listing or filter; pass the same filter as "
            "the request that returned it"
        )
    cursor: list[Any] = body["c"]
    return cursor
