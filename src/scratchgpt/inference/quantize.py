"""Faster inference weights: int8 (per output channel) and bfloat16. See scratchgpt.model.quantize.

The layer, the kernels and `quantize_model` live in `model/quantize.py` (pure torch); saving and
loading quantized run directories in `checkpoint.py`. This module gathers them for inference code.
"""

from scratchgpt.checkpoint import load_quantized, quantize_checkpoint, save_quantized
from scratchgpt.device import cpu_capability, native_bf16
from scratchgpt.model.quantize import (
    INFERENCE_DTYPES,
    KERNELS,
    QUANT_MODES,
    Int8Embedding,
    Int8Linear,
    cast_weights,
    default_kernel,
    prepare_for_inference,
    quantize_model,
    quantize_weight,
    quantized_mode,
    set_kernel,
)

__all__ = ["INFERENCE_DTYPES", "KERNELS", "QUANT_MODES", "Int8Embedding", "Int8Linear", "cast_weights",
           "cpu_capability", "default_kernel", "load_quantized", "native_bf16", "prepare_for_inference",
           "quantize_checkpoint", "quantize_model", "quantize_weight", "quantized_mode", "save_quantized", "set_kernel"]
