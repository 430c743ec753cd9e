"""Quantized layers and whole-model conversion."""
from .convert import ConversionReport, quantize_model
from .modules import QuantConv2d, QuantLinear
from .quantizer import LSQQuantizer

__all__ = ["LSQQuantizer", "QuantConv2d", "QuantLinear", "quantize_model", "ConversionReport"]
