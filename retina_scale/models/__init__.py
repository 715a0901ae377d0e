"""The paper's network family, its layers, weight transfer between stages and complexity counts."""

from retina_scale.models.complexity import count_complexity, family_complexity
from retina_scale.models.convnet import RetinaConvNet, StageSpec, build_model, get_stage
from retina_scale.models.layers import GridRMSPool2D, Maxout, RGBRescale, RMSPool2D
from retina_scale.models.transfer import TransferReport, named_weights, transfer_weights

__all__ = [
    "GridRMSPool2D", "Maxout", "RGBRescale", "RMSPool2D", "RetinaConvNet", "StageSpec", "TransferReport",
    "build_model", "count_complexity", "family_complexity", "get_stage", "named_weights",
    "transfer_weights",
]
