"""Step buffers of the onnxruntime backend: where IO binding points ONNX Runtime (numpy
arrays in host memory for the CPU provider, torch tensors on the device for CUDA, so the
argmax and KV writes run on the backend's torch stream)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["CpuIo", "CudaIo"]


class CpuIo:
    """Step buffers as numpy arrays in host memory."""

    device_type, device_id = "cpu", 0

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = None) -> Any:
        return np.zeros(shape, dtype or self.dtype)

    @staticmethod
    def ptr(a: Any) -> int:
        return int(a.ctypes.data)

    def prompt(self, ids: Sequence[int], batch: int) -> Any:
        return np.ascontiguousarray(np.broadcast_to(np.asarray(ids, np.int64), (batch, len(ids))))

    def upload(self, a: Any) -> Any:
        return a

    @staticmethod
    def set_position(pos_buf: Any, pos: int) -> None:
        pos_buf[()] = pos

    @staticmethod
    def argmax(logits: Any, ids: Any) -> None:
        ids[:, 0] = logits[:, 0].argmax(-1)

    @staticmethod
    def tolist(a: Any) -> list[int]:
        return [int(x) for x in a]


class CudaIo(CpuIo):
    """Step buffers as torch tensors on one CUDA device (torch ops on the current stream)."""

    device_type = "cuda"

    def __init__(self, dtype: Any, device: torch.device, torch_dt: torch.dtype) -> None:
        super().__init__(dtype)
        self.device, self.device_id, self.torch_dtype = device, device.index or 0, torch_dt

    def zeros(self, shape: int | tuple[int, ...], dtype: Any = None) -> Any:
        dt = torch.int64 if dtype is np.int64 else self.torch_dtype
        return torch.zeros(shape, dtype=dt, device=self.device)

    @staticmethod
    def ptr(a: Any) -> int:
        return int(a.data_ptr())

    def prompt(self, ids: Sequence[int], batch: int) -> Any:
        return torch.tensor(list(ids), dtype=torch.int64).view(1, -1).expand(batch, -1)

    def upload(self, a: Any) -> Any:
        return a.to(self.device).contiguous()

    @staticmethod
    def set_position(pos_buf: Any, pos: int) -> None:
        pos_buf.fill_(pos)

    @staticmethod
    def argmax(logits: Any, ids: Any) -> None:
        ids.copy_(logits[:, 0].argmax(-1, keepdim=True))

    @staticmethod
    def tolist(a: Any) -> list[int]:
        return [int(x) for x in a.tolist()]
