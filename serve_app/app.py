"""Ray Serve: the trained A-LLMRec stack behind a typed HTTP API.

Three deployments, composed with `.bind()` and called through `DeploymentHandle`s:
- `Ingress` (FastAPI): routes, validation, the body-size limit, the optional bearer token;
- `Recommender` (CPU): the CF backbone, Stage 1's text path, the joint item embeddings and the
  catalogue (`allmrec.serving.StackRecommender`); items added at run time are written to
  the run's storage, one record each under `<run>/serve/added_items/`, which every replica
  replays, so any replica on any node can recommend an item that another one added;
- `LLM`: the frozen LLM with the trained projectors (`allmrec.serving.StackLLM`), on a GPU when
  the replica has one, with `@serve.batch` so concurrent requests share generation passes.

Run it with `allmrec serve` (local), `serve run serve_app/config.yaml` or `serve deploy`.
No `from __future__ import annotations` here: FastAPI reads the route annotations as types,
and inside a Serve ingress class it cannot resolve them from strings.
"""

import asyncio
import hmac
import logging
import os
import threading
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from allmrec.api import (
    TOKEN_ENV,
    BadRequest,
    ItemInfo,
    NewItem,
    RankedItem,
    RecommendRequest,
    RecommendResponse,
)
from allmrec.serving import Limits, StackLLM, StackRecommender, item_content
from allmrec.storage import RecordLog, RunStorage
from allmrec.training.stage2 import STACK

log = logging.getLogger("allmrec.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Recommender:
    def __init__(self, run_dir: str, limits: dict) -> None:
        run = RunStorage.open(run_dir)
        self.core = StackRecommender(run.pull(*STACK), Limits(**limits))
        self.added = RecordLog(run.uri("serve", "added_items"))
        # Serve runs these methods on several threads: the log's replay and each add's claim
        # and insert go one at a time (the catalogue itself is locked by StackRecommender).
        self.adding = threading.Lock()

    def _replay(self) -> None:
        """Apply the items that any replica added since the last request."""
        with self.adding:
            for record in self.added.new_records():
                try:
                    self.core.add_item(NewItem(**record))
                except BadRequest as err:  # two replicas took one id on an object store
                    log.warning("added item %s not replayed: %s", record.get("item_id"), err)

    def prepare(self, request: dict) -> dict:
        self._replay()
        try:
            return {"ok": self.core.llm_request(RecommendRequest(**request))}
        except BadRequest as err:
            return {"error": err.payload(), "status": err.status}

    def add_item(self, item: dict) -> dict:
        """Adds the item (its id given: the ingress names new ones), once in the whole
        service: its record is claimed in the shared log first, so a retry, here or on another
        replica, finds it and is answered with the item that exists (`created` False)."""
        self._replay()
        new = NewItem(**item)
        try:
            encoded = self.core.encode_item(new)  # the slow part, outside the lock
            with self.adding:
                if new.item_id in self.core.item_index:
                    info, created = self.core.add_item(new, encoded)
                else:
                    there = self.added.claim(new.item_id, new.model_dump())
                    record = new if there is None else NewItem(**there)
                    if item_content(record) != item_content(new):
                        # another replica added another item under this id: this replica
                        # holds that one too (the log counts it as seen), then refuses
                        self.core.add_item(record)
                        raise BadRequest("item_id", f"item id {new.item_id!r} exists already", 409)
                    info, created = self.core.add_item(new, encoded)
                    created = created and there is None
        except BadRequest as err:
            return {"error": err.payload(), "status": err.status}
        return {"ok": info.model_dump(), "created": created}

    def item(self, item_id: str) -> dict:
        self._replay()
        try:
            return {"ok": self.core.item_info(item_id).model_dump()}
        except BadRequest as err:
            return {"error": err.payload(), "status": err.status}

    def item_embedding(self, item_id: str) -> dict:
        """The item's joint embedding as this replica holds it, and which replica answered:
        for an operator (or a test) checking that every replica knows an added item alike."""
        self._replay()
        replica = serve.get_replica_context().replica_id.unique_id
        try:
            return {"ok": {"replica": replica, "z": self.core.joint_embedding(item_id)}}
        except BadRequest as err:
            return {"error": err.payload(), "status": err.status}

    def added_items(self) -> dict:
        """Every item added at run time as this replica holds it: (id, title, z), and which
        replica answered."""
        self._replay()
        replica = serve.get_replica_context().replica_id.unique_id
        return {"replica": replica, "items": self.core.added_items()}

    def catalogue(self, query: list[float], history_ids: list[str], k: int) -> list[dict]:
        """The top `k` of the whole catalogue by the readout's user vector `query`, the
        history (item ids: this replica may number added items otherwise) left out."""
        self._replay()
        top = self.core.catalogue_top(query, self.core.indices_of(history_ids), k)
        named = self.core.catalogue_items([i for i, _ in top])
        return [
            {"item_id": item_id, "title": title, "score": score}
            for (item_id, title), (_, score) in zip(named, top, strict=True)
        ]

    def version(self) -> str:
        return self.core.version


@serve.deployment(ray_actor_options={"num_cpus": 1})
class LLM:
    def __init__(
        self,
        run_dir: str,
        max_new_tokens: int,
        max_batch_size: int,
        batch_wait_s: float,
        threads: int | None,
        dtype: str,
    ) -> None:
        import torch

        if threads:
            # Ray gives an actor of under one CPU a single OpenMP thread; the LLM's forward
            # pass is the service's cost, and one pass of a batch uses the threads it is given.
            torch.set_num_threads(threads)
        from allmrec.llm import fastest_dtype

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype, speedup = fastest_dtype(device)
            if device == "cpu":
                log.info("LLM replica: %s (bf16 matmuls %.2fx fp32's here)", dtype, speedup)
            else:
                log.info("LLM replica: %s on the GPU", dtype)
        stack = RunStorage.open(run_dir).pull(*STACK)
        self.core = StackLLM(stack, device, None if dtype == "trained" else dtype)
        # the dtype it runs in, for an operator (`batches`)
        self.dtype = self.core.dtype
        self.max_new_tokens = max_new_tokens
        self.answer.set_max_batch_size(max_batch_size)
        self.answer.set_batch_wait_timeout_s(batch_wait_s)
        self.largest_batch = 0  # since this replica began: for an operator, or a test

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def answer(self, requests: list[dict]) -> list[dict]:
        # The forward passes run in a thread: the replica keeps accepting requests meanwhile,
        # and the requests that arrive during one pass make the next batch.
        self.largest_batch = max(self.largest_batch, len(requests))
        return await asyncio.to_thread(self.core.answer, requests, self.max_new_tokens)

    def batches(self) -> dict:
        return {"largest_batch": self.largest_batch, "dtype": self.dtype}

    def ready(self) -> bool:
        return True


api = FastAPI(
    title="allmrec",
    description="A-LLMRec: a CF model aligned with a frozen LLM. Recommend, add cold items.",
    version="1",
)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return JSONResponse(
        status_code=422,
        content={"error": first.get("msg", "invalid"), "field": field, "errors": len(exc.errors())},
    )


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)}
    return JSONResponse(status_code=exc.status_code, content=detail, headers=exc.headers)


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    """Refuse a body over the limit before reading it (and one of unknown length)."""
    if request.method in ("POST", "PUT", "PATCH"):
        limit = request.app.state.max_body_bytes
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse(
                status_code=411, content={"error": "a Content-Length is required", "field": "body"}
            )
        if not length.isdigit() or int(length) > limit:
            return JSONResponse(
                status_code=413,
                content={"error": f"body over the limit of {limit} bytes", "field": "body"},
            )
    return await call_next(request)


async def _check_token(request: Request) -> None:
    token = request.app.state.token
    if not token:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(
            401,
            {"error": "missing or wrong bearer token", "field": "Authorization"},
            headers={"WWW-Authenticate": "Bearer"},
        )


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        recommender: DeploymentHandle,
        llm: DeploymentHandle,
        max_body_bytes: int,
        token_env: str,
    ) -> None:
        self.recommender, self.llm = recommender, llm
        self.retried_calls = 0  # calls whose replica died under them, since this replica began
        self.model_version: str | None = None  # the stack's: fixed for the app's lifetime
        api.state.max_body_bytes = max_body_bytes
        api.state.token = os.environ.get(token_env, "")

    async def _call(self, handle: DeploymentHandle, method: str, *args, retries: int = 4):
        """A handle call, retried when the replica died under it: the router may still pick
        the dead replica for a moment, so the waits grow (0.25 s to 2 s, 3.75 s in all) until
        another replica takes over. `/readyz` reports how many calls were retried."""
        for attempt in range(retries + 1):
            try:
                return await getattr(handle, method).remote(*args)
            except RayActorError as exc:
                if attempt == retries:
                    raise
                self.retried_calls += attempt == 0
                log.warning(
                    "%s.%s: its replica died (%s); retry %d of %d",
                    handle.deployment_name,
                    method,
                    type(exc).__name__,
                    attempt + 1,
                    retries,
                )
                await asyncio.sleep(0.25 * 2**attempt)

    @staticmethod
    def _unwrap(result: dict) -> dict:
        if "error" in result:
            raise HTTPException(result["status"], result["error"])
        return result["ok"]

    @api.post("/recommend", response_model=RecommendResponse, dependencies=[Depends(_check_token)])
    async def recommend(self, request: RecommendRequest) -> RecommendResponse:
        started = time.perf_counter()
        prepared = self._unwrap(await self._call(self.recommender, "prepare", request.model_dump()))
        answer = await self._call(self.llm, "answer", prepared)
        source = prepared["candidates_from"]
        if source == "catalogue" and "query" in answer:
            # The readout scores any item: rank the whole catalogue with its user vector.
            found = await self._call(
                self.recommender, "catalogue", answer["query"], prepared["history_ids"], request.k
            )
            items = [RankedItem(**item) for item in found]
        else:
            source = "retrieval" if source == "catalogue" else source
            items = [
                RankedItem(
                    item_id=prepared["item_ids"][i],
                    title=prepared["titles"][i],
                    score=score,
                )
                for i, score in answer["items"][: request.k]
            ]
        if self.model_version is None:  # asked once: one handle call fewer a request
            self.model_version = await self._call(self.recommender, "version")
        return RecommendResponse(
            items=items,
            generated=answer.get("generated"),
            candidates_from=source,
            model_version=self.model_version,
            seconds=round(time.perf_counter() - started, 4),
        )

    @api.post(
        "/items",
        response_model=ItemInfo,
        status_code=201,
        responses={200: {"model": ItemInfo, "description": "added before: a retried add"}},
        dependencies=[Depends(_check_token)],
    )
    async def add_item(self, item: NewItem) -> ItemInfo | JSONResponse:
        # A new item is named here, so that the call is idempotent and can be retried when a
        # replica dies under it: a retry finds the item added and is answered with it.
        item.item_id = item.item_id or f"new-{uuid.uuid4().hex[:10]}"
        result = await self._call(self.recommender, "add_item", item.model_dump())
        info = ItemInfo(**self._unwrap(result))
        if not result["created"]:  # added before (a retried add): 200, not 201
            return JSONResponse(status_code=200, content=info.model_dump())
        return info

    @api.get("/items/{item_id}", response_model=ItemInfo, dependencies=[Depends(_check_token)])
    async def get_item(self, item_id: str) -> ItemInfo:
        return ItemInfo(**self._unwrap(await self._call(self.recommender, "item", item_id)))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready once both the recommender and the LLM answer (their stacks are loaded)."""
        try:
            version, _ = await asyncio.wait_for(
                asyncio.gather(self.recommender.version.remote(), self.llm.ready.remote()),
                timeout=5,
            )
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSONResponse(
                status_code=503, content={"status": "not ready", "error": type(exc).__name__}
            )
        return JSONResponse(
            content={
                "status": "ready",
                "model_version": version,
                "retried_calls": self.retried_calls,
            }
        )


class AppArgs(BaseModel):
    """The application's arguments (`args` of the Serve config), validated by Serve before
    `build_app` runs; the one place their defaults live."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="the trained stack: data/ cf/ stage1/ stage2/")
    max_history: int = Field(Limits.max_history, ge=1)
    max_candidates: int = Field(Limits.max_candidates, ge=1)
    shortlist: int = Field(Limits.shortlist, ge=1, description="retrieved when none are given")
    max_new_tokens: int = Field(24, ge=1, description="generate mode's answer length")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch of the LLM deployment")
    batch_wait_s: float = Field(
        0.01, ge=0, description="@serve.batch: how long a batch waits for more requests"
    )
    llm_threads: int | None = Field(
        None, ge=1, description="torch threads of an LLM replica (None: Ray's, 1 below a CPU)"
    )
    llm_dtype: Literal["trained", "auto", "float32", "bfloat16"] = Field(
        "trained",
        description="the LLM's dtype in an LLM replica: the one Stage 2 trained in; 'auto', "
        "the faster of fp32 and bf16 on the replica's machine, measured as it starts (bf16 "
        "where it is 1.3x faster or more: CPUs with bf16 instructions, GPUs); or one named. "
        "Scores in bf16 differ from fp32's in the third digit",
    )
    max_body_bytes: int = Field(65536, ge=1)
    token_env: str = Field(TOKEN_ENV, description="if set where the ingress runs, the bearer token")
    # `serve run` applies the config's `deployments` itself; `allmrec serve` passes them here.
    deployments: list[dict] = Field(default_factory=list)


def build_app(args: AppArgs) -> serve.Application:
    """The application builder of `serve run` / `serve deploy` (Serve validates the config's
    `args` into `AppArgs`) and of `allmrec serve`."""
    run_dir = RunStorage.open(args.run_dir).home
    limits = {"max_history": args.max_history, "max_candidates": args.max_candidates}
    limits["shortlist"] = args.shortlist
    options = {d["name"]: d for d in args.deployments}

    def configured(deployment):
        opts = {k: v for k, v in options.get(deployment.name, {}).items() if k != "name"}
        return deployment.options(**opts) if opts else deployment

    recommender = configured(Recommender).bind(run_dir, limits)
    llm = configured(LLM).bind(
        run_dir,
        args.max_new_tokens,
        args.max_batch_size,
        args.batch_wait_s,
        args.llm_threads,
        args.llm_dtype,
    )
    return configured(Ingress).bind(recommender, llm, args.max_body_bytes, args.token_env)
