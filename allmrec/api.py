"""The HTTP API's request and answer types, shared by the Serve app (`serve_app/app.py`) and
the client (`allmrec.client`). Only pydantic: a client imports neither torch nor Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The environment variable that holds the bearer token, where the ingress runs and for clients.
TOKEN_ENV = "ALLMREC_SERVE_TOKEN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    user_id: str | None = Field(None, description="a user of the training data")
    history: list[str] | None = Field(
        None, description="item ids the user interacted with, most recent last"
    )
    candidates: list[str] | None = Field(
        None,
        description="item ids to rank; absent: the whole catalogue when the stack's readout "
        "scores any item (user_item), else a shortlist retrieved from the whole catalogue",
    )
    k: int = Field(10, ge=1, description="how many ranked items to return")
    mode: Literal["rank", "generate"] = Field(
        "rank",
        description="rank: the readout of a stack trained with the rank objective (else the "
        "likelihood of each title); generate: the paper's greedy generation",
    )


class RankedItem(_Strict):
    item_id: str
    title: str
    score: float | None = Field(
        None,
        description="rank mode: the readout's score (rank objective) or the title's "
        "log-likelihood (generate objective); higher is better",
    )


class RecommendResponse(_Strict):
    items: list[RankedItem]
    generated: str | None = None
    candidates_from: Literal["request", "retrieval", "catalogue"]
    model_version: str
    seconds: float


class NewItem(_Strict):
    title: str = Field(min_length=1, max_length=500)
    description: str = Field("", max_length=5000)
    item_id: str | None = Field(None, max_length=200, description="default: a new id")


class ItemInfo(_Strict):
    item_id: str
    title: str
    source: Literal["item", "text", "added"] = Field(
        description="z_i from the CF item path, from text (cold item), or added at run time"
    )
    train_interactions: int


class BadRequest(ValueError):
    """Input a client can fix: an HTTP 4xx naming the field."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def payload(self) -> dict:
        return {"error": self.message, "field": self.field}
