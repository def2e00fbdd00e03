"""vtprune: prune and compress the visual tokens of vision-language models.

    pruning = vtprune.wrap(model, method="fastv", keep=64)
    model.generate(**inputs)
    pruning.kept, pruning.seq_lens
    pruning.unwrap()
"""

from vtprune.api import adapter_for, report, unwrap, wrap
from vtprune.core.compose import Compose
from vtprune.core.context import ItemView, PruneContext
from vtprune.core.handle import Pruning
from vtprune.core.vit import ViTMethod, ViTPruning
from vtprune.core.registry import (
    Merged,
    Method,
    ModelInfo,
    SingleStageMethod,
    Stage,
    list_methods,
    method_class,
    method_kind,
    register_method,
)
from vtprune.methods import (
    CATP,
    AdaptInfer,
    DART,
    VTCCLS,
    DivPrune,
    Downsample,
    EntropyPrune,
    EVS,
    EViT,
    FastV,
    FasterVLM,
    FlowCut,
    HiPrune,
    InfoHorizon,
    MMTok,
    MustDrop,
    Pool,
    PyramidDrop,
    Random,
    SparseVLM,
    ToDRE,
    ToMe,
    TransPrune,
    Uniform,
    VFlowOpt,
    VisionDrop,
    VisionZip,
    VisPruner,
    ZooPrune,
)

__version__ = "0.1.0"

__all__ = [
    "Compose",
    "wrap",
    "unwrap",
    "adapter_for",
    "report",
    "list_methods",
    "method_kind",
    "ViTMethod",
    "ViTPruning",
    "EViT",
    "FlowCut",
    "ToMe",
    "method_class",
    "register_method",
    "Merged",
    "Method",
    "SingleStageMethod",
    "ModelInfo",
    "Stage",
    "PruneContext",
    "ItemView",
    "Pruning",
    "AdaptInfer",
    "CATP",
    "DART",
    "DivPrune",
    "Downsample",
    "EntropyPrune",
    "EVS",
    "FastV",
    "FasterVLM",
    "HiPrune",
    "InfoHorizon",
    "MMTok",
    "MustDrop",
    "Pool",
    "PyramidDrop",
    "Random",
    "SparseVLM",
    "ToDRE",
    "TransPrune",
    "Uniform",
    "VTCCLS",
    "VFlowOpt",
    "VisionDrop",
    "VisPruner",
    "VisionZip",
    "ZooPrune",
]
