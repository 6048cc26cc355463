"""Bad requests get a 4xx with an OpenAI-style error body; the cluster keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import Cluster, Reference, completion_answer
from tests.e2e.prompts import COMPLETION_CASES, MAX_MODEL_LEN, SERVED_NAME

pytestmark = pytest.mark.e2e


def _post(cluster: Cluster, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{cluster.http}{path}", timeout=60, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404),
        (
            "/v1/chat/completions",
            {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
            404,
        ),
        (
            "/v1/completions",
            {"model": SERVED_NAME, "prompt": "hi", "max_tokens": MAX_MODEL_LEN},
            400,
        ),
        ("/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 0}, 400),
        ("/v1/completions", {"model": SERVED_NAME, "prompt": "word " * 2000}, 400),
        ("/v1/completions", {"model": SERVED_NAME, "prompt": ""}, 400),
        ("/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "n": 3}, 400),
        ("/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "temperature": -1}, 400),
        ("/v1/completions", {"model": SERVED_NAME}, 400),
        ("/v1/chat/completions", {"model": SERVED_NAME, "messages": []}, 400),
        (
            "/v1/chat/completions",
            {"model": SERVED_NAME, "messages": [{"role": "wizard", "content": "x"}]},
            400,
        ),
    ],
)
def test_bad_json_requests(
    cluster: Cluster, path: str, body: dict[str, object], status: int
) -> None:
    r = _post(cluster, path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["code"] == status


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"[1, 2", "\udcff".encode("utf-8", "surrogatepass")]
)
def test_malformed_bodies(cluster: Cluster, raw: bytes) -> None:
    r = _post(cluster, "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_cluster_keeps_serving_after_bad_requests(cluster: Cluster, reference: Reference) -> None:
    for _ in range(3):
        _post(
            cluster,
            "/v1/completions",
            content=b"{oops",
            headers={"content-type": "application/json"},
        )
    prompt, max_tokens = COMPLETION_CASES[4]
    assert completion_answer(cluster.openai(), prompt, max_tokens) == reference.completions[4]
