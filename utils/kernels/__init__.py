"""Fast, exact kernels for ReFusion's blocks (see README.md beside this file).

``REFUSION_PLAIN_KERNELS=1`` in the environment (read at import) sends every primitive to its
plain lines in ``plain.py`` instead: the same function in PyTorch's own layers, to compare with,
debug or port from.
"""
import os

PLAIN = os.environ.get("REFUSION_PLAIN_KERNELS", "0") not in ("", "0")

if PLAIN:
    from utils.kernels.plain import (conv_part, conv_parts, depthwise_conv3x3, gated_product,
                                     head_attention, in_strips, pointwise_conv, project_attended)
else:
    from utils.kernels.attention import head_attention, project_attended
    from utils.kernels.linear import depthwise_conv3x3, pointwise_conv
    from utils.kernels.memory import conv_part, conv_parts, gated_product, in_strips

__all__ = ["PLAIN", "conv_part", "conv_parts", "depthwise_conv3x3", "gated_product", "head_attention",
           "in_strips", "pointwise_conv", "project_attended"]
