"""Exact-length prompts for black-box APIs.

An API tokenizes the prompt itself, so a prompt of exactly p tokens is text that the model's
tokenizer (a local copy the user names) encodes to exactly p tokens, special tokens included
(`encode(text, add_special_tokens=True)`, what servers do with Hugging Face tokenizers: a
tokenizer that adds a BOS leaves p - 1 tokens of content).

Construction (`PromptBuilder.build(p, seed)`, deterministic in (tokenizer, p, seed)):
1. The pool: every non-special token id whose text, encoded alone, gives back that id
   (computed once per tokenizer; partial UTF-8 bytes and added tokens are excluded).
2. Draw k = p - specials ids from the pool with `random.Random(seed)`, decode to text and
   re-encode. Concatenated token texts may merge or split (BPE), so the count can differ:
   remove ids from the end while too long, draw more while too short, and re-check, up to
   `max_repairs` rounds. The draws continue from the same seeded generator, so a repair is
   deterministic too.
3. Should the count oscillate (rare: a boundary that merges whichever way it is cut), retry
   from a derived seed with the pool restricted to "word" tokens (a space followed by
   letters), which most pre-tokenizers keep apart; failing that, FailedPrecondition.

The API's `usage.prompt_tokens` is still checked against p for every sample (a server-side
tokenizer that differs from the local copy shows up there, not here).

Token-id prompts (`Prompt.ids`) are the same tokens for APIs that accept a list of ids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.profiler.reasons import (
    PROMPT_CONSTRUCTION_FAILED,
    PROMPT_TOO_SHORT,
    TOKENIZER_BACKEND_MISSING,
    TOKENIZER_NOT_FOUND,
    TOKENIZER_REQUIRED,
    TOKENIZER_UNUSABLE,
)

__all__ = [
    "Prompt",
    "PromptBuilder",
    "PromptTokenizer",
    "load_tokenizer",
]

_WORD = re.compile(r"^[ \u2581][A-Za-z]+$")


class PromptTokenizer(Protocol):
    """What prompt construction needs from a tokenizer."""

    name: str  # the path it was loaded from
    sha256: str  # of its files, for provenance

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded alone."""
        ...

    def special_ids(self) -> frozenset[int]: ...


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    ids: tuple[int, ...]  # encode(text) with special tokens: len(ids) == p


class _RustTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` library."""

    def __init__(self, path: Path, files: Sequence[Path]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.name = str(path.parent if path.name == "tokenizer.json" else path)
        self.sha256 = _hash_files(files)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        return [
            str(s) for s in self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
        ]

    def special_ids(self) -> frozenset[int]:
        return frozenset(int(i) for i in self._tok.get_added_tokens_decoder())


class _HfTokenizer:
    """Any other local Hugging Face tokenizer directory (e.g. SentencePiece), through
    transformers' AutoTokenizer, offline."""

    def __init__(self, path: Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise FailedPrecondition(
                TOKENIZER_BACKEND_MISSING,
                f"{path} has no tokenizer.json; loading it needs transformers: "
                "pip install 'idealrt[transformers]'",
                field="profile.target.tokenizer",
            ) from exc
        self._tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.name = str(path)
        self.sha256 = _hash_files(sorted(p for p in path.iterdir() if p.is_file()))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    def special_ids(self) -> frozenset[int]:
        ids = set(self._tok.all_special_ids)
        ids.update(int(i) for i in getattr(self._tok, "added_tokens_decoder", {}))
        return frozenset(ids)


def _hash_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def load_tokenizer(path: str) -> PromptTokenizer:
    """A local tokenizer: a `tokenizer.json` file, or a directory holding one (loaded with
    `tokenizers`), or another Hugging Face tokenizer directory (loaded with transformers,
    offline). Nothing is downloaded."""
    if not path:
        raise InvalidArgument(
            TOKENIZER_REQUIRED,
            "an HTTP target needs a local tokenizer (a tokenizer.json or a Hugging Face "
            "tokenizer directory) to build prompts of exactly p tokens",
            field="profile.target.tokenizer",
        )
    p = Path(path).expanduser()
    if p.is_file():
        return _RustTokenizer(p, [p])
    if p.is_dir():
        tj = p / "tokenizer.json"
        if tj.is_file():
            return _RustTokenizer(tj, [tj])
        return _HfTokenizer(p)
    raise InvalidArgument(
        TOKENIZER_NOT_FOUND,
        f"tokenizer {path!r} is neither a tokenizer.json file nor a directory",
        field="profile.target.tokenizer",
    )


class PromptBuilder:
    """Builds exact-length prompts for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: PromptTokenizer, *, max_repairs: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_repairs = max_repairs
        self.specials = len(tokenizer.encode("", add_special_tokens=True))

    @functools.cached_property
    def pool(self) -> tuple[int, ...]:
        """Ids that round-trip alone: encode(decode([i])) == [i]."""
        tok = self.tokenizer
        special = tok.special_ids()
        ids = [i for i in range(tok.vocab_size) if i not in special]
        texts = tok.decode_each(ids)
        keep = [(i, t) for i, t in zip(ids, texts, strict=True) if t and "\ufffd" not in t]
        encoded = tok.encode_batch([t for _, t in keep])
        pool = tuple(i for (i, _), e in zip(keep, encoded, strict=True) if e == [i])
        if not pool:
            raise FailedPrecondition(
                TOKENIZER_UNUSABLE,
                f"no token of tokenizer {tok.name} round-trips through decode/encode",
                field="profile.target.tokenizer",
            )
        return pool

    @functools.cached_property
    def word_pool(self) -> tuple[int, ...]:
        words = [
            i
            for i, t in zip(self.pool, self.tokenizer.decode_each(self.pool), strict=True)
            if _WORD.match(t)
        ]
        return tuple(words) or self.pool

    def min_prompt_tokens(self) -> int:
        return self.specials + 1

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one builder per target, bounded cache
    def build(self, p: int, seed: int) -> Prompt:
        """Text that encodes to exactly p tokens (special tokens included)."""
        if p < self.min_prompt_tokens():
            raise InvalidArgument(
                PROMPT_TOO_SHORT,
                f"prompt_tokens={p}: this tokenizer adds {self.specials} special token(s), so "
                f"a prompt needs at least {self.min_prompt_tokens()} tokens",
                field="plan.prompt_tokens",
            )
        for pool, salt in ((self.pool, 0), (self.word_pool, 1), (self.word_pool, 2)):
            prompt = self._attempt(p, random.Random(f"{seed}:{salt}"), pool)
            if prompt is not None:
                return prompt
        raise FailedPrecondition(
            PROMPT_CONSTRUCTION_FAILED,
            f"could not build a prompt of exactly {p} tokens with tokenizer "
            f"{self.tokenizer.name} (seed {seed})",
            field="plan.prompt_tokens",
        )

    def _attempt(self, p: int, rng: random.Random, pool: Sequence[int]) -> Prompt | None:
        content = [rng.choice(pool) for _ in range(p - self.specials)]
        for _ in range(self.max_repairs):
            text = self.tokenizer.decode(content)
            ids = self.tokenizer.encode(text, add_special_tokens=True)
            diff = p - len(ids)
            if diff == 0:
                return Prompt(text=text, ids=tuple(ids))
            if diff > 0:
                content.extend(rng.choice(pool) for _ in range(diff))
            else:
                del content[max(1, len(content) + diff) :]
        return None
