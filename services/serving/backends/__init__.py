"""Serving backends: one module per stack, each exposing `create_backend()`.

`base` holds the protocol (`Backend`) and the shared load checks; its results
(`MemoryReport`, `GenerationResult`) are the serving contract in
`idealrt.core.serving_contract`. Backend modules are imported only when their backend is used
(`idealrt.services.serving.registry`), so a missing optional dependency affects that
backend alone.
"""

from idealrt.services.serving.backends.base import (
    Backend,
    BackendFactory,
    check_memory,
    check_options,
    device_memory,
    resolve_device,
)

__all__ = [
    "Backend",
    "BackendFactory",
    "check_memory",
    "check_options",
    "device_memory",
    "resolve_device",
]
