"""Native fp32 kernels for the pytorch backend's CPU decode step: GEMV and attention.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the
weights once, plus one attention per layer whose cost is reading the K/V cache once. On the
CPU, ATen's x @ W goes to MKL's sgemm with m = 1, which reads weights at ~65% of the
bandwidth a plain streaming read reaches on the AVX-512 EPYC machines we profile on, and
scaled_dot_product_attention for one query reads a 512-token cache at ~half of it.
`kernels.c` (next to this file) has a GEMV that reads W [in, out] as four sequential row
streams per pass over y, and a single-token attention (per head: scores, softmax with a
vectorised exp, weighted V sum; head sizes 64 and 128 specialised), both vectorised with
the compiler's widest vectors and split over threads by columns / heads. bench_backends
reports both kernel choices side by side.

The kernels are compiled at first use with the system C compiler ($CC, else `cc`), with
`-O3 -march=native -fopenmp`, into `<cache root>/kernels/kernels-<key>.so`, where the key
hashes the source, the compiler's version line, the flags and the CPU's model and feature
flags: a different machine or compiler builds its own. The write is atomic (temporary file,
then rename). Before use, the loaded library is checked against ATen on odd shapes (GEMV
with and without bias; attention with grouped heads, an offset window, three head sizes);
any failure (no compiler, a compile error, a wrong result) raises NativeUnavailable with
the reason, and the backend falls back to ATen (or refuses when the stack asked for
`kernels=native`).

ctypes releases the GIL for the call, so other threads of the server run meanwhile.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from idealrt.core.logging import get_logger

__all__ = ["NativeKernels", "NativeUnavailable", "kernel_path", "load_kernels"]

_log = get_logger(__name__)
_SOURCE = "kernels.c"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_X86_FLAGS = ("-mprefer-vector-width=512",)
_lock = threading.Lock()
_loaded: dict[Path, NativeKernels] = {}


def _threads() -> int:
    """torch's intra-op thread count, but never more threads than the cores this process
    may run on (a process pinned to one core with two threads would time-share it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores))


class NativeUnavailable(RuntimeError):
    """The native kernel cannot be built or failed its check; the message says why."""


@dataclasses.dataclass(frozen=True)
class NativeKernels:
    """The loaded kernels: `self(x, w, b)` is y [1, N] = x [1, K] @ w [K, N] (+ b [N]);
    `attend_step` is one layer's single-token attention (cache write included). fp32, CPU,
    contiguous weights."""

    path: Path
    _fn: Callable[..., None]
    _attend: Callable[..., None]

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        k, n = w.shape
        x = x.contiguous()
        y = torch.empty((1, n), dtype=torch.float32)
        self._fn(
            x.data_ptr(),
            w.data_ptr(),
            None if b is None else b.data_ptr(),
            y.data_ptr(),
            k,
            n,
            _threads(),
        )
        return y

    def attend_step(
        self,
        qkv: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: int,
        lo: int,
        scale: float,
        *,
        heads: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        interleaved: bool = False,
        alibi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One layer's attention for one new token (batch 1), from its qkv projection
        [1, 1, (heads + 2 kv_heads) D]: rotary (rope = this position's cos, sin rows) on q
        and k, k and v written into the cache layers k, v [1, kv_heads, max_context, D] at
        row `pos`, then softmax(scale q.K + ALiBi) V over rows lo..pos. Returns
        [1, 1, heads D], the row the output projection reads. fp32 throughout."""
        kv_heads, d = k.shape[1], k.shape[3]
        qkv = qkv.contiguous()
        out = torch.empty((1, 1, heads * d), dtype=torch.float32)
        work = torch.empty(heads * d + heads * (pos + 1 - lo), dtype=torch.float32)
        base = work.data_ptr()
        cos, sin = rope if rope is not None else (None, None)
        self._attend(
            qkv.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            base,
            base + heads * d * 4,
            heads,
            kv_heads,
            k.stride(1),
            pos,
            lo,
            d,
            scale,
            None if cos is None else cos.data_ptr(),
            None if sin is None else sin.data_ptr(),
            0 if cos is None else cos.shape[-1],
            int(interleaved),
            None if alibi is None else alibi.data_ptr(),
            _threads(),
        )
        return out


def _cpu_identity() -> str:
    """CPU model and feature flags: a kernel built with -march=native is only valid there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    found = shutil.which(cc)
    if found is None:
        raise NativeUnavailable(f"no C compiler: {cc!r} is not on PATH (set CC)")
    return found


def _flags() -> tuple[str, ...]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return _FLAGS + (_X86_FLAGS if x86 else ())


def kernel_path(cache_root: Path) -> Path:
    """Where this machine's build of the kernel lives (built or not)."""
    cc = _compiler()
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"C compiler {cc} does not run: {e}") from e
    source = resources.files(__package__).joinpath(_SOURCE).read_text()
    key = hashlib.sha256(
        "\0".join([source, cc, *version, *_flags(), _cpu_identity()]).encode()
    ).hexdigest()[:24]
    return cache_root / "kernels" / f"kernels-{key}.so"


def _build(path: Path) -> None:
    cc = _compiler()
    path.parent.mkdir(parents=True, exist_ok=True)
    source = resources.files(__package__).joinpath(_SOURCE).read_text()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        src = Path(tmp) / _SOURCE
        src.write_text(source)
        out = Path(tmp) / path.name
        proc = subprocess.run(
            [cc, *_flags(), str(src), "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            raise NativeUnavailable(
                f"compiling {_SOURCE} with {cc} failed: {proc.stderr.strip()[-2000:]}"
            )
        os.replace(out, path)


def _check(kernel: NativeKernels) -> None:
    """Agreement with ATen on shapes that exercise the 4-row blocks, the remainder rows
    and the vector tail, with and without bias, on one and on all threads."""
    gen = torch.Generator().manual_seed(0)
    for k, n in ((7, 37), (64, 129), (130, 48)):
        x = torch.randn(1, k, generator=gen)
        w = torch.randn(k, n, generator=gen)
        b = torch.randn(n, generator=gen)
        for bias in (None, b):
            want = x @ w if bias is None else torch.addmm(bias, x, w)
            got = kernel(x, w, bias)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                err = (got - want).abs().max().item()
                raise NativeUnavailable(f"native GEMV disagrees with ATen on {k}x{n}: {err:g}")
    for heads, kv_heads, d, lo, pos in ((4, 4, 64, 0, 36), (8, 2, 128, 5, 69), (3, 1, 24, 0, 8)):
        cache = torch.randn(2, 1, kv_heads, 80, d, generator=gen)
        qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * d, generator=gen)
        q, kn, vn = qkv.view(heads + 2 * kv_heads, d).split((heads, kv_heads, kv_heads))
        want_cache = cache.clone()
        want_cache[0, 0, :, pos], want_cache[1, 0, :, pos] = kn, vn
        qg = q.reshape(1, kv_heads, heads // kv_heads, d)
        keys = want_cache[:, :, :, lo : pos + 1]
        want = F.scaled_dot_product_attention(qg, keys[0], keys[1], scale=0.3)
        got = kernel.attend_step(qkv, cache[0], cache[1], pos, lo, 0.3, heads=heads)
        if not (
            torch.allclose(got.view(-1), want.reshape(-1), rtol=1e-4, atol=1e-5)
            and torch.equal(cache, want_cache)
        ):
            err = (got.view(-1) - want.reshape(-1)).abs().max().item()
            raise NativeUnavailable(f"native attention disagrees with ATen (D={d}): {err:g}")


def load_kernels(cache_root: Path) -> NativeKernels:
    """This machine's kernel: built if needed, loaded once per process, checked."""
    path = kernel_path(cache_root)
    with _lock:
        if path in _loaded:
            return _loaded[path]
        if not path.exists():
            _log.info("native_kernels_build", path=str(path))
            _build(path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise NativeUnavailable(f"cannot load {path}: {e}") from e
        fn = lib.idealrt_gemv_f32
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
        fn.restype = None
        attend = lib.idealrt_attend_step_f32
        attend.argtypes = [
            *[ctypes.c_void_p] * 6,
            *[ctypes.c_long] * 6,
            ctypes.c_float,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_long,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        attend.restype = None
        kernel = NativeKernels(path, fn, attend)
        _check(kernel)
        _loaded[path] = kernel
        return kernel
