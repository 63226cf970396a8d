"""The CF backbones A-LLMRec builds on: SASRec (the paper's default), GRU4Rec, NextItNet, NCF."""

# base first: it defines CFBackbone before importing the model modules that subclass it.
from allmrec.models.base import BACKBONES, CFBackbone, build_backbone
from allmrec.models.gru4rec import GRU4Rec, GRU4RecConfig
from allmrec.models.ncf import NCF, NCFConfig
from allmrec.models.nextitnet import NextItNet, NextItNetConfig
from allmrec.models.sasrec import SASRec, SASRecConfig

__all__ = [
    "BACKBONES",
    "CFBackbone",
    "GRU4Rec",
    "GRU4RecConfig",
    "NCF",
    "NCFConfig",
    "NextItNet",
    "NextItNetConfig",
    "SASRec",
    "SASRecConfig",
    "build_backbone",
]
