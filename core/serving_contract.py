"""The serving service's contract types, shared by the server, the profiler and the client
library: what a load reports (`MemoryReport`, `LoadedModel`) and what a generation returns
(`GenerationResult`). They live in core so that a client never imports a server
(house style, "Layers"): the serving registry and its backends build them, the client
library rebuilds them from the wire, the profiler consumes them.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from idealrt.core.domain import StackSpec
from idealrt.core.errors import Internal
from idealrt.core.model_spec import ModelSpec
from idealrt.core.reasons import NONCONFORMING_GENERATION

__all__ = ["GenerationResult", "LoadedModel", "MemoryReport"]


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes after a load: what the model holds, and the device's total and free memory."""

    weights_bytes: int
    kv_cache_bytes: int
    device_total_bytes: int
    device_free_bytes: int
    # Options the backend settled where the stack left the choice to it (e.g. pytorch's
    # gemv=auto -> native or aten); the registry records them in the loaded model's stack.
    resolved_options: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One exact-length generation, timed inside the backend.

    output_ids: the tokens of the first batch row (every row has the same prompt).
    prefill_ns: request start -> first output token; decode_ns[i]: end of token i+1 -> end
    of token i+2 (output_tokens - 1 entries); total_ns = prefill_ns + sum(decode_ns).
    Construction raises Internal(NONCONFORMING_GENERATION) when the counts disagree.
    """

    prompt_tokens: int
    output_tokens: int
    output_ids: tuple[int, ...]
    prefill_ns: int
    decode_ns: tuple[int, ...]
    total_ns: int
    start_time: datetime
    batch_size: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.prompt_tokens < 1:
            problems.append(f"prompt_tokens={self.prompt_tokens} < 1")
        if self.output_tokens < 1:
            problems.append(f"output_tokens={self.output_tokens} < 1")
        if len(self.output_ids) != self.output_tokens:
            problems.append(f"{len(self.output_ids)} output ids for {self.output_tokens} tokens")
        if len(self.decode_ns) != self.output_tokens - 1:
            problems.append(f"{len(self.decode_ns)} decode steps for {self.output_tokens} tokens")
        if self.total_ns != self.prefill_ns + sum(self.decode_ns):
            problems.append("total_ns != prefill_ns + sum(decode_ns)")
        if self.prefill_ns < 0 or any(d < 0 for d in self.decode_ns):
            problems.append("negative duration")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} < 1")
        if problems:
            raise Internal(NONCONFORMING_GENERATION, "invalid generation: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model loaded on a stack: its spec, the stack as the backend settled it, memory,
    load time and the context it was allocated for."""

    model_id: str
    name: str
    spec: ModelSpec
    stack: StackSpec
    memory: MemoryReport
    load_ns: int
    max_context: int
    create_time: datetime
    seed: int = 0
    weights_path: str = ""
    request_id: str = ""
