"""quantize: layer-wise calibrated post-training quantization (Hubara et al. 2021, "AdaQuant").

Symmetric uniform fake-quantization (weights per output channel, activations per tensor) and
per-layer bit allocation by integer programming. See ../shared/METHODS.md §1.
"""
