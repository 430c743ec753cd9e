"""Quantized layers and whole-model conversion."""
from .convert import (ConversionReport, find_unsigned_inputs, initialize_quantizers, layer_scales, quantize_model,
                      quantized_layers)
from .modules import QuantConv2d, QuantLinear
from .quantizer import LSQQuantizer

__all__ = ["LSQQuantizer", "QuantConv2d", "QuantLinear", "quantize_model", "ConversionReport",
           "quantized_layers", "layer_scales", "find_unsigned_inputs", "initialize_quantizers"]
