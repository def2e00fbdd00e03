"""Pruning methods: one module per method, each registering its class in the core registry when imported."""

from vtprune.methods.adaptinfer import AdaptInfer
from vtprune.methods.atp import ATPLLaVA
from vtprune.methods.catp import CATP
from vtprune.methods.dart import DART
from vtprune.methods.divprune import DivPrune
from vtprune.methods.downsample import Downsample
from vtprune.methods.dtop import DToPSegmenter
from vtprune.methods.dycoke import DyCoke
from vtprune.methods.dyvte import DyVTE
from vtprune.methods.entropyprune import EntropyPrune
from vtprune.methods.evit import EViT
from vtprune.methods.evs import EVS
from vtprune.methods.fastervlm import FasterVLM
from vtprune.methods.fastv import FastV
from vtprune.methods.fastvid import FastVID
from vtprune.methods.flowcut import FlowCut
from vtprune.methods.hiprune import HiPrune
from vtprune.methods.holitom import HoliTom
from vtprune.methods.infohorizon import InfoHorizon
from vtprune.methods.mmtok import MMTok
from vtprune.methods.mustdrop import MustDrop
from vtprune.methods.pdrop import PyramidDrop
from vtprune.methods.pool import Pool
from vtprune.methods.prunevid import PruneVid
from vtprune.methods.random import Random
from vtprune.methods.sparsevlm import SparseVLM
from vtprune.methods.todre import ToDRE
from vtprune.methods.tokenflex import TokenFLEX
from vtprune.methods.tome import ToMe
from vtprune.methods.transprune import TransPrune
from vtprune.methods.uniform import Uniform
from vtprune.methods.vflowopt import VFlowOpt
from vtprune.methods.visiondrop import VisionDrop
from vtprune.methods.vispruner import VisPruner
from vtprune.methods.visionzip import VisionZip
from vtprune.methods.vtc_cls import VTCCLS
from vtprune.methods.zoo_prune import ZooPrune

__all__ = [
    "AdaptInfer",
    "ATPLLaVA",
    "CATP",
    "DART",
    "DivPrune",
    "Downsample",
    "DToPSegmenter",
    "DyCoke",
    "DyVTE",
    "EViT",
    "EVS",
    "EntropyPrune",
    "FastV",
    "FastVID",
    "FasterVLM",
    "FlowCut",
    "HiPrune",
    "HoliTom",
    "InfoHorizon",
    "MMTok",
    "MustDrop",
    "Pool",
    "PruneVid",
    "PyramidDrop",
    "Random",
    "SparseVLM",
    "ToDRE",
    "TokenFLEX",
    "ToMe",
    "TransPrune",
    "Uniform",
    "VTCCLS",
    "VFlowOpt",
    "VisionDrop",
    "VisPruner",
    "VisionZip",
    "ZooPrune",
]
