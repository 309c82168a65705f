"""Inference: samplers, the language-model protocol and result types, the compiled generation loop,
speculative decoding's draft sources and its loop. The public names are re-exported from ``ssdkit``."""
