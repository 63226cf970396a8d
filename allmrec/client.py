"""A Python client for the Serve app's HTTP API (docs/serving.md); `allmrec recommend` uses it.

    from allmrec.client import Client
    client = Client("http://127.0.0.1:8000")        # token: $ALLMREC_SERVE_TOKEN if set
    answer = client.recommend(user_id="1", k=5)      # an allmrec.api.RecommendResponse
    for item in answer.items:
        print(item.item_id, item.title, item.score)

Requests are checked against the API's own types before they are sent, so a bad argument fails
here with pydantic's message. A 503 (the service is starting, or a replica is being replaced)
and a refused connection are retried with exponential backoff: neither reached the model, so
retrying cannot add an item twice. A read that times out is not retried. Any other error
answer raises `ServeError` with the status and the field the service named. Only pydantic and
requests: a client needs neither torch nor Ray.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import requests

from allmrec.api import TOKEN_ENV, ItemInfo, NewItem, RecommendRequest, RecommendResponse


class ServeError(RuntimeError):
    """The service answered with an error: `status`, its message and the `field` it named."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        where = f" ({field})" if field else ""
        super().__init__(f"HTTP {status}{where}: {message}")
        self.status, self.message, self.field = status, message, field


class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout_s: float = 300.0,
        retries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.session = requests.Session()

    def recommend(
        self,
        user_id: str | None = None,
        history: list[str] | None = None,
        candidates: list[str] | None = None,
        k: int = 10,
        mode: Literal["rank", "generate"] = "rank",
    ) -> RecommendResponse:
        """Ranked items for a known user or for a history (item ids, most recent last)."""
        body = RecommendRequest(
            user_id=user_id, history=history, candidates=candidates, k=k, mode=mode
        )
        answer = self._call("POST", "/recommend", body.model_dump(exclude_none=True))
        return RecommendResponse.model_validate(answer)

    def add_item(self, title: str, description: str = "", item_id: str | None = None) -> ItemInfo:
        """A new item from its text; the next request can rank it."""
        body = NewItem(title=title, description=description, item_id=item_id)
        return ItemInfo.model_validate(
            self._call("POST", "/items", body.model_dump(exclude_none=True))
        )

    def item(self, item_id: str) -> ItemInfo:
        return ItemInfo.model_validate(self._call("GET", f"/items/{item_id}"))

    def ready(self) -> bool:
        """True when both the recommender and the LLM answer; False while they load, when the
        answer does not come within 10 s, or when nothing listens at the URL (no retries)."""
        try:
            response = self.session.get(f"{self.url}/readyz", timeout=min(self.timeout_s, 10))
        except (requests.ConnectionError, requests.Timeout):  # starting: the proxy may hang
            return False
        return response.status_code == 200

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.session.request(
                    method, self.url + path, json=body, headers=headers, timeout=self.timeout_s
                )
            except requests.ConnectionError as exc:
                if last:
                    raise ConnectionError(
                        f"{self.url}{path}: no connection after {attempt + 1} tries "
                        f"({_reason(exc)})"
                    ) from None
            else:
                if response.status_code != 503 or last:
                    return _answer(response)
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    """The innermost OS-level reason of a connection error ("Connection refused"), else its
    message: urllib3 wraps it in two layers of pool and retry text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = (
            seen.__cause__
            or seen.__context__
            or next((a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)), None)
        )
    return str(exc)


def _answer(response: requests.Response) -> Any:
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text.strip() or response.reason}
    if response.ok:
        return payload
    if isinstance(payload, dict):
        raise ServeError(response.status_code, str(payload.get("error")), payload.get("field"))
    raise ServeError(response.status_code, str(payload))
