"""Loading real weights into the reference decoder.

Sources: a `.safetensors` file, a `.bin`/`.pt` state dict, or a Hugging Face model directory
(`model.safetensors`, sharded `model.safetensors.index.json`, `pytorch_model.bin`, sharded
`pytorch_model.bin.index.json`). Tensor names are either the decoder's own
(`Decoder.state_dict()`) or Hugging Face's for the spec's family, mapped by the per-family
rules below (fused q/k/v, Conv1D transposes, per-head interleaved qkv of NeoX/BLOOM, SwiGLU
gate+up). Tensors are read one target parameter at a time (safetensors are memory-mapped),
so loading never holds a second copy of the model.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from idealrt.core.errors import FailedPrecondition, InvalidArgument
from idealrt.services.serving.checkpoints import FIELD, checkpoint_files, not_a_checkpoint
from idealrt.services.serving.decoder.model import Decoder
from idealrt.services.serving.reasons import (
    DEPENDENCY_MISSING,
    FAMILY_UNSUPPORTED,
    WEIGHTS_MISMATCH,
)

__all__ = ["FIELD", "hf_rules", "load_weights_", "open_tensors"]

Transform = Callable[[list[torch.Tensor]], torch.Tensor]
Rule = tuple[str, list[str], Transform]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _one(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _conv1d(ts: list[torch.Tensor]) -> torch.Tensor:
    """GPT-2's Conv1D stores [in, out] (-> [out, in]); a bias is unchanged."""
    return ts[0].t() if ts[0].dim() == 2 else ts[0]


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _per_head_qkv(heads: int) -> Transform:
    """NeoX/BLOOM fuse qkv per head ([heads, 3, head_dim] rows); ours is [3, heads, hd]."""

    def f(ts: list[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        rest = t.shape[1:]
        return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)

    return f


def _lin(dst: str, srcs: list[str], how: Transform = _one) -> list[Rule]:
    return [
        (f"{dst}_w", [f"{s}.weight" for s in srcs], how),
        (f"{dst}_b", [f"{s}.bias" for s in srcs], how),
    ]


def _family_rules(family: str, heads: int) -> tuple[list[str], list[Rule], list[Rule], str]:
    """(base prefixes, top-level rules, per-layer rules with {i}, LM head key)."""
    top: list[Rule]
    layer: list[Rule]
    L = "layers.{i}."
    if family == "gpt2":
        h = "h.{i}."
        layer = [
            *_lin(L + "attn_norm", [h + "ln_1"]),
            *_lin(L + "qkv", [h + "attn.c_attn"], _conv1d),
            *_lin(L + "o", [h + "attn.c_proj"], _conv1d),
            *_lin(L + "mlp_norm", [h + "ln_2"]),
            *_lin(L + "up", [h + "mlp.c_fc"], _conv1d),
            *_lin(L + "down", [h + "mlp.c_proj"], _conv1d),
        ]
        top = [("embed", ["wte.weight"], _one), ("pos_embed", ["wpe.weight"], _one)]
        return ["transformer.", ""], top + _lin("final_norm", ["ln_f"]), layer, "lm_head"
    if family == "gptj":
        h = "h.{i}."
        qkv = [h + f"attn.{x}_proj" for x in "qkv"]
        layer = [
            *_lin(L + "attn_norm", [h + "ln_1"]),
            *_lin(L + "qkv", qkv, _cat),
            *_lin(L + "o", [h + "attn.out_proj"]),
            *_lin(L + "up", [h + "mlp.fc_in"]),
            *_lin(L + "down", [h + "mlp.fc_out"]),
        ]
        top = [("embed", ["wte.weight"], _one), *_lin("final_norm", ["ln_f"])]
        return ["transformer.", ""], top, layer, "lm_head"
    if family in ("gpt_neox", "bloom"):
        neox = family == "gpt_neox"
        h = "layers.{i}." if neox else "h.{i}."
        attn = h + ("attention." if neox else "self_attention.")
        layer = [
            *_lin(L + "attn_norm", [h + "input_layernorm"]),
            *_lin(L + "qkv", [attn + "query_key_value"], _per_head_qkv(heads)),
            *_lin(L + "o", [attn + "dense"]),
            *_lin(L + "mlp_norm", [h + "post_attention_layernorm"]),
            *_lin(L + "up", [h + "mlp.dense_h_to_4h"]),
            *_lin(L + "down", [h + "mlp.dense_4h_to_h"]),
        ]
        if neox:
            top = [("embed", ["embed_in.weight"], _one), *_lin("final_norm", ["final_layer_norm"])]
            return ["gpt_neox.", ""], top, layer, "embed_out"
        top = [
            ("embed", ["word_embeddings.weight"], _one),
            *_lin("embed_norm", ["word_embeddings_layernorm"]),
            *_lin("final_norm", ["ln_f"]),
        ]
        return ["transformer.", ""], top, layer, "lm_head"
    if family == "opt":
        h = "layers.{i}."
        layer = [
            *_lin(L + "attn_norm", [h + "self_attn_layer_norm"]),
            *_lin(L + "qkv", [h + f"self_attn.{x}_proj" for x in "qkv"], _cat),
            *_lin(L + "o", [h + "self_attn.out_proj"]),
            *_lin(L + "mlp_norm", [h + "final_layer_norm"]),
            *_lin(L + "up", [h + "fc1"]),
            *_lin(L + "down", [h + "fc2"]),
        ]
        top = [
            ("embed", ["embed_tokens.weight"], _one),
            ("pos_embed", ["embed_positions.weight"], _one),
            *_lin("final_norm", ["final_layer_norm"]),
        ]
        return ["model.decoder.", "decoder.", ""], top, layer, "lm_head"
    if family in ("llama", "mistral"):
        h = "layers.{i}."
        layer = [
            *_lin(L + "attn_norm", [h + "input_layernorm"]),
            *_lin(L + "qkv", [h + f"self_attn.{x}_proj" for x in "qkv"], _cat),
            *_lin(L + "o", [h + "self_attn.o_proj"]),
            *_lin(L + "mlp_norm", [h + "post_attention_layernorm"]),
            *_lin(L + "up", [h + "mlp.gate_proj", h + "mlp.up_proj"], _cat),
            *_lin(L + "down", [h + "mlp.down_proj"]),
        ]
        top = [("embed", ["embed_tokens.weight"], _one), *_lin("final_norm", ["norm"])]
        return ["model.", ""], top, layer, "lm_head"
    raise InvalidArgument(
        FAMILY_UNSUPPORTED, f"no weight mapping for family {family!r}", field="model.spec.family"
    )


def hf_rules(decoder: Decoder, keys: set[str]) -> list[Rule]:
    """Rules (decoder parameter, Hugging Face source names, transform) for every parameter
    of `decoder`, with the base prefix ("transformer.", "model.", ...) that `keys` use.
    Transforms yield Hugging Face's nn.Linear orientation [out, in]; `load_weights_`
    transposes matrices into the decoder's [in, out]. A tied head reads the embedding."""
    spec = decoder.spec
    prefixes, top, layer, head = _family_rules(spec.family, spec.heads)
    embed_src = top[0][1][0]
    prefix = next((p for p in prefixes if p + embed_src in keys), prefixes[0])
    rules = [(dst, [prefix + s for s in srcs], how) for dst, srcs, how in top]
    for i in range(spec.layers):
        for dst, srcs, how in layer:
            rules.append((dst.format(i=i), [prefix + s.format(i=i) for s in srcs], how))
    head_src = prefix + embed_src if spec.tied_embeddings else f"{head}.weight"
    rules += [("head_w", [head_src], _one), ("head_b", [f"{head}.bias"], _one)]
    params = dict(decoder.named_parameters())
    return [r for r in rules if r[0] in params]


_TABLES = ("embed", "pos_embed")  # row-lookup tables keep [rows, d]
# Buffers some HF checkpoints carry that hold no weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".masked_bias")


class _Tensors:
    """Read-only, lazy name -> tensor view over one or more files."""

    def __init__(self, getters: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._getters = getters

    def keys(self) -> set[str]:
        return set(self._getters)

    def get(self, key: str) -> torch.Tensor:
        return self._getters[key]()


def _open_safetensors(f: Path, stack: ExitStack) -> dict[str, Callable[[], torch.Tensor]]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise FailedPrecondition(
            DEPENDENCY_MISSING,
            "reading .safetensors needs the safetensors package: pip install idealrt[transformers]",
        ) from None
    try:
        handle: Any = stack.enter_context(safe_open(str(f), framework="pt"))
        names = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise not_a_checkpoint(f, f"safetensors cannot open it ({e})") from None

    def get(name: str) -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise not_a_checkpoint(f, f"tensor {name!r} cannot be read ({e})") from None

    return {k: functools.partial(get, k) for k in names}


def _open_torch(f: Path) -> dict[str, Callable[[], torch.Tensor]]:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        # weights_only refuses anything but tensors and containers (UnpicklingError); a
        # corrupt archive is a RuntimeError of torch's zip reader
        raise not_a_checkpoint(f, f"torch.load cannot read it ({str(e)[:200]})") from None
    if not isinstance(sd, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise not_a_checkpoint(f, "it does not hold a state dict (tensor name -> tensor)")
    return {k: functools.partial(_same, v) for k, v in sd.items()}


@contextmanager
def open_tensors(path: str | os.PathLike[str]) -> Iterator[_Tensors]:
    """The tensors stored at `path` (a file or a Hugging Face directory), lazily;
    InvalidArgument WEIGHTS_NOT_FOUND / WEIGHTS_INVALID (`checkpoints`) when `path` does
    not hold a readable checkpoint."""
    getters: dict[str, Callable[[], torch.Tensor]] = {}
    with ExitStack() as stack:
        for f in checkpoint_files(path):
            if f.suffix == ".safetensors":
                getters.update(_open_safetensors(f, stack))
            else:
                getters.update(_open_torch(f))
        yield _Tensors(getters)


@torch.no_grad()
def load_weights_(decoder: Decoder, path: str | os.PathLike[str]) -> None:
    """Copy the weights at `path` into `decoder` (cast to its dtype, moved to its device).
    Every parameter must be found and every stored tensor used (HF buffers excepted);
    otherwise InvalidArgument(WEIGHTS_MISMATCH) lists what differs."""
    params = dict(decoder.named_parameters())
    with open_tensors(path) as src:
        keys = src.keys()
        native = set(params) <= keys
        if native:
            rules: list[Rule] = [(name, [name], _one) for name in params]
        else:
            rules = hf_rules(decoder, keys)
        missing = [s for _, srcs, _ in rules for s in srcs if s not in keys]
        used = {s for _, srcs, _ in rules for s in srcs}
        if decoder.spec.tied_embeddings:
            used |= {"lm_head.weight", "embed_out.weight"}  # some checkpoints store the tie
        unused = sorted(k for k in keys - used if not k.endswith(_IGNORED_SUFFIXES))
        if missing or unused:
            raise InvalidArgument(
                WEIGHTS_MISMATCH,
                f"weights at {str(path)!r} do not fit spec {decoder.spec.name!r} "
                f"(family {decoder.spec.family}): missing {missing[:8]}, unexpected {unused[:8]}",
                field=FIELD,
            )
        for dst, srcs, how in rules:
            t = how([src.get(s) for s in srcs])
            if not native and t.dim() == 2 and dst not in _TABLES:
                t = t.t()  # [out, in] -> the decoder's [in, out]
            p = params[dst]
            if t.shape != p.shape:
                raise InvalidArgument(
                    WEIGHTS_MISMATCH,
                    f"{dst} from {srcs}: stored shape {tuple(t.shape)}, "
                    f"the spec needs {tuple(p.shape)}",
                    field=FIELD,
                )
            p.copy_(t)
