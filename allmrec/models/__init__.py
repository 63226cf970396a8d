"""The CF backbones A-LLMRec builds on: SASRec (the paper's default), GRU4Rec, NextItNet, NCF."""

from __future__ import annotations

import dataclasses
from typing import Any

from allmrec.models.base import CFBackbone
from allmrec.models.gru4rec import GRU4Rec, GRU4RecConfig
from allmrec.models.ncf import NCF, NCFConfig
from allmrec.models.nextitnet import NextItNet, NextItNetConfig
from allmrec.models.sasrec import SASRec, SASRecConfig

BACKBONES: dict[str, type[CFBackbone]] = {
    "sasrec": SASRec,
    "gru4rec": GRU4Rec,
    "nextitnet": NextItNet,
    "ncf": NCF,
}


def build_backbone(name: str, num_items: int, num_users: int, **hparams: Any) -> CFBackbone:
    """Build the backbone ``name`` (one of BACKBONES) for a dataset's item and user counts.

    ``hparams`` override the fields of the model's config dataclass, so
    ``build_backbone(model.name, **dataclasses.asdict(model.config))`` rebuilds ``model``'s
    architecture. Unknown names and unknown hyperparameters raise ValueError.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    cls = BACKBONES[name]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(hparams) - fields)
    if unknown:
        raise ValueError(
            f"backbone {name!r}: unknown hyperparameter(s) {unknown}; "
            f"{cls.config_class.__name__} has {sorted(fields)}"
        )
    config = cls.config_class(num_items=num_items, num_users=num_users, **hparams)
    return cls(config)


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
