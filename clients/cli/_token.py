"""`idealrt token-hash`: the SHA-256 a static tokens file stores for a token."""

from __future__ import annotations

import argparse
import getpass
import sys

from idealrt.clients.cli._render import emit_json
from idealrt.core.auth import token_sha256

__all__ = ["cmd_token_hash"]


def cmd_token_hash(args: argparse.Namespace) -> int:
    """Reads one token from stdin (without echo on a terminal) and prints its sha256 for a
    `[[token]]` entry of IDEALRT_AUTH_TOKENS_FILE. The token itself is never printed."""
    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.read()
    token = token.strip()
    if not token:
        raise SystemExit("error: no token on stdin")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise SystemExit("error: a token is one word of printable ASCII (no spaces)")
    digest = token_sha256(token)
    if args.json:
        emit_json({"sha256": digest})
    else:
        print(digest)
    return 0
