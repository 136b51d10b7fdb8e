"""Fast, exact kernels for ReFusion's blocks (see README.md beside this file)."""
from utils.kernels.attention import head_attention, project_attended
from utils.kernels.linear import depthwise_conv3x3, pointwise_conv
from utils.kernels.memory import conv_part, conv_parts, gated_product, in_strips

__all__ = ["conv_part", "conv_parts", "depthwise_conv3x3", "gated_product", "head_attention",
           "in_strips", "pointwise_conv", "project_attended"]
