"""Python client for a taskray Serve endpoint.

>>> from serve.client import Client
>>> client = Client("http://127.0.0.1:8000")
>>> client.classify("The battery died after two days.").label
'Negative'
"""

from __future__ import annotations

import time
from typing import Any, overload

import httpx

from serve.schemas import ClassifyResponse, ClassLabel, ModelList


class TaskrayError(RuntimeError):
    """The server answered with an error; ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str, kind: str = "error") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.kind = kind


class Client:
    """Synchronous client; ``retries`` applies to connection errors and 503 only."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError:
                if attempt >= self.retries:
                    raise
            else:
                if response.status_code != 503 or attempt >= self.retries:
                    break
            time.sleep(self.backoff_s * (2**attempt))
            attempt += 1
        if response.status_code >= 400:
            try:
                err = response.json().get("error", {})
                message, kind = err.get("message", response.text), err.get("type", "error")
            except ValueError:
                message, kind = response.text, "error"
            raise TaskrayError(response.status_code, message, kind)
        return response.json()

    def health(self) -> bool:
        """True when the server process answers."""
        return self._http.get("/healthz").status_code == 200

    def ready(self) -> bool:
        """True when every model is loaded."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 120.0, interval_s: float = 0.5) -> None:
        """Poll ``/readyz`` until it answers 200, or raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(interval_s)
        raise TimeoutError(f"server not ready after {timeout_s:.0f}s")

    def models(self) -> ModelList:
        """The served models."""
        return ModelList.model_validate(self._request("GET", "/v1/models"))

    @overload
    def classify(
        self, text: str, *, model: str | None = ..., return_all_scores: bool = ...
    ) -> ClassLabel: ...

    @overload
    def classify(
        self, text: list[str], *, model: str | None = ..., return_all_scores: bool = ...
    ) -> list[ClassLabel]: ...

    def classify(
        self,
        text: str | list[str],
        *,
        model: str | None = None,
        return_all_scores: bool = False,
    ) -> ClassLabel | list[ClassLabel]:
        """Classify one text (→ one result) or a list (→ a list in the same order)."""
        body: dict[str, Any] = {"return_all_scores": return_all_scores}
        if isinstance(text, str):
            body["text"] = text
        else:
            body["texts"] = list(text)
        if model is not None:
            body["model"] = model
        result = ClassifyResponse.model_validate(
            self._request("POST", "/v1/tasks/classification", body)
        )
        return result.predictions[0] if isinstance(text, str) else result.predictions
