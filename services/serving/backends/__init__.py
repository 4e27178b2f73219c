"""Serving backends: one module per stack, each exposing `create_backend()`.

`base` holds the protocol (`Backend`), its results (`MemoryReport`, `GenerationResult`) and
the shared load checks. Backend modules are imported only when their backend is used
(`idealrt.services.serving.registry`), so a missing optional dependency affects that
backend alone.
"""

from idealrt.services.serving.backends.base import (
    Backend,
    BackendFactory,
    GenerationResult,
    MemoryReport,
    check_memory,
    check_options,
    device_memory,
    resolve_device,
)

__all__ = [
    "Backend",
    "BackendFactory",
    "GenerationResult",
    "MemoryReport",
    "check_memory",
    "check_options",
    "device_memory",
    "resolve_device",
]
