"""quantize: layer-wise calibrated post-training quantization (Hubara et al. 2021, "AdaQuant").

Symmetric uniform fake-quantization (weights per output channel, activations per tensor) and
per-layer bit allocation by integer programming. See ../shared/METHODS.md §1.
"""

from deploypipe.stage_index import StageInfo

STAGE = StageInfo(
    help="Post-training quantization: BN folding, calibrated ranges, AdaQuant (W/A bits, first/last 8-bit)",
    config="deploypipe.stages.quantize.config:QuantizeConfig",
    headline=("test_top1", "fp_top1", "size_fraction_of_fp32", "ip_average_bits", "calibration_seconds"))
