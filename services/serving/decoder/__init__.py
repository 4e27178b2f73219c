"""The reference decoder: one PyTorch implementation of every supported family, whose math
the pytorch, onnxruntime and tensorrt backends all run (so comparing stacks compares stacks,
not models). See `model` for the three forward entry points and `export` for the ONNX step.
"""

from idealrt.services.serving.decoder.block import Block
from idealrt.services.serving.decoder.build import (
    INIT_STD,
    TORCH_DTYPES,
    build_decoder,
    init_random_,
    meta_decoder,
    planned_bytes,
    torch_dtype,
)
from idealrt.services.serving.decoder.export import DecoderStep, export_onnx
from idealrt.services.serving.decoder.model import Decoder

__all__ = [
    "INIT_STD",
    "TORCH_DTYPES",
    "Block",
    "Decoder",
    "DecoderStep",
    "build_decoder",
    "export_onnx",
    "init_random_",
    "meta_decoder",
    "planned_bytes",
    "torch_dtype",
]
