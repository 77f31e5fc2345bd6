"""Input safety of the service, in-process: schemathesis fuzzing of its OpenAPI schema, then hostile inputs by hand.

Fuzzing: schemathesis generates requests from the schema the service publishes
(``/docs.json``), valid ones ("positive") and ones that break it ("negative"), and sends them
through the service's own ASGI app. No answer may be a 5xx; valid requests must be answered
(200, or 404 for an item the catalogue lacks); every other 4xx must say where the problem is
(``detail[].loc``). ``STRATAREC_FUZZ_EXAMPLES`` sets the number of generated requests (default
100, split between both modes; a benchmark can ask for 1000 or more).

Explicit cases: oversized bodies (declared and chunked), huge and negative ``k``, ids that are
not integers, unicode junk, invalid UTF-8, deeply nested JSON, bodies that are not objects,
media types other than JSON (multipart uploads, forms, pickle) and file paths or URLs as
values: each is a 4xx whose message names the field, and nothing is read from or written to disk.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FUZZ_EXAMPLES = max(2, int(os.environ.get("STRATAREC_FUZZ_EXAMPLES", "100")))
API_ROUTES = ("/recommend", "/recommend/batch", "/similar-items", "/status")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_request_log")


@pytest.fixture(scope="module")
def client(serve, released, log_dir):
    with serve({"STRATAREC_MODEL_TAG": released["tag"], "STRATAREC_REQUEST_LOG": str(log_dir)}) as c:
        yield c


@pytest.fixture(scope="module")
def schema(client, tmp_path_factory):
    import schemathesis
    from hypothesis.configuration import set_hypothesis_home_dir, storage_directory

    # Hypothesis caches (examples, constants, unicode tables) go to a temporary folder, not ./.hypothesis in the checkout.
    previous = storage_directory(intent_to_write=False).home_directory
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield schemathesis.openapi.from_dict(client.get("/docs.json").json())
    set_hypothesis_home_dir(previous)


def _send(client, case):
    """Send a schemathesis case through the Starlette test client (the service's lifespan is the module's)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    body = {"content": kwargs["data"]} if "data" in kwargs else {"content": json.dumps(kwargs["json"])} if "json" in kwargs else {}
    return client.request(kwargs["method"], kwargs["url"], headers=kwargs["headers"], params=kwargs.get("params"), **body)


def _locations(response) -> list[list]:
    detail = response.json()["detail"]
    return [d["loc"] for d in detail] if isinstance(detail, list) else [[detail]]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_5xx(client, schema, mode):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.path in API_ROUTES and op.method.upper() == "POST"]
    assert {op.path for op in operations} == set(API_ROUTES)
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    statuses: dict[int, int] = {}

    @settings(
        max_examples=FUZZ_EXAMPLES // 2,
        deadline=None,
        database=None,  # nothing written into the checkout
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of([op.as_strategy(generation_mode=generation) for op in operations]))
    def check(case):
        response = _send(client, case)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, response.text
        if mode == "positive":
            assert response.status_code == 200 or (case.operation.path == "/similar-items" and response.status_code == 404), (
                f"a request the schema allows was refused: {response.status_code} {response.text}"
            )
        elif 400 <= response.status_code < 500 and response.status_code != 404:
            assert all(loc for loc in _locations(response)), f"a 4xx that names no field: {response.text}"

    t0 = time.perf_counter()
    check()
    seconds = time.perf_counter() - t0
    print(f"\n{mode} fuzzing: {sum(statuses.values())} requests in {seconds:.1f} s, statuses {dict(sorted(statuses.items()))}")


def _post_raw(client, route, content, content_type="application/json", **kwargs):
    return client.post(route, content=content, headers={"content-type": content_type}, **kwargs)


DEEP = 100_000  # far past the JSON parser's depth limit (200)


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/recommend", {"user_id": 1, "k": 10**30}, "k"),
        ("/recommend", {"user_id": 1, "k": 1001}, "k"),
        ("/recommend", {"user_id": 1, "k": -5}, "k"),
        ("/recommend", {"user_id": 1, "k": 0}, "k"),
        ("/recommend/batch", {"requests": [{"user_id": 1, "k": 10**30}]}, "k"),
        ("/similar-items", {"item_id": 1, "k": -1}, "k"),
        ("/recommend", {"user_id": "12"}, "user_id"),
        ("/recommend", {"user_id": 1.0}, "user_id"),
        ("/recommend", {"user_id": True}, "user_id"),
        ("/recommend", {"user_id": None}, "user_id"),
        ("/recommend", {"user_id": [1]}, "user_id"),
        ("/recommend", {"user_id": {"$gt": 0}}, "user_id"),
        ("/recommend", {"user_id": 10**40}, "user_id"),
        ("/recommend", {"user_id": 1, "exclude": ["x"]}, "exclude"),
        ("/recommend", {"user_id": 1, "exclude": [1.5]}, "exclude"),
        ("/recommend", {"user_id": 1, "exclude": 7}, "exclude"),
        ("/recommend", {"user_id": 1, "diversify": "yes"}, "diversify"),
        ("/recommend", {"user_id": 1, "discovery": -1}, "discovery"),
        ("/recommend", {"user_id": 1, "discovery": 2.5}, "discovery"),
        ("/similar-items", {"item_id": "abc"}, "item_id"),
        ("/recommend", {"user_id": "💥\u202e\u0000\ufeff"}, "user_id"),
        ("/recommend", {"user_id": "١٢٣"}, "user_id"),  # Arabic-Indic digits are not an id
        ("/recommend", {"user_id": 1, "k": "\U0001f4a5"}, "k"),
        ("/recommend", {"us\u0435r_id": 1}, "user_id"),  # a Cyrillic "е": an unknown key, and user_id missing
        ("/recommend", {"user_id": 1, "path": "/etc/passwd"}, "path"),
        ("/recommend", {"user_id": "/etc/passwd"}, "user_id"),
        ("/recommend", {"user_id": "file:///etc/passwd"}, "user_id"),
        ("/recommend/batch", {"requests": [{"user_id": 1, "exclude": [[[[[[[[[[1]]]]]]]]]]}]}, "exclude"),
    ],
)
def test_malformed_values_are_4xx_naming_the_field(client, route, body, field):
    r = client.post(route, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert any(field in loc for loc in _locations(r)), r.text
    assert r.json()["error"]


@pytest.mark.parametrize(
    ("content", "field", "expected_in_msg"),
    [
        ('{"user_id": ' + "[" * DEEP + "]" * DEEP + "}", "user_id", "recursion limit"),
        ('{"requests": [{"user_id": 1, "exclude": ' + "[" * DEEP + "]" * DEEP + "}]}", "exclude", "recursion limit"),
        ('{"user_id": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}", "user_id", "recursion limit"),
        (b'{"user_id": "\xff\xfe\xfd"}', "user_id", "Invalid JSON"),  # not UTF-8
        ('{"user_id": "\\ud800"}', "user_id", "Invalid JSON"),  # a lone surrogate
        ('{"user_id": 1, "k": NaN}', "k", "valid integer"),  # the parser takes NaN; the model does not
        ('{"user_id": 1,,}', "user_id", "Invalid JSON"),
        ("{not json", "body", "Invalid JSON"),
        ('{"user_id": 1} trailing', "body", "Invalid JSON"),
        ("null", "body", "JSON object"),
        ("[]", "body", "JSON object"),
        ('"user_id"', "body", "JSON object"),
        ("\ufeff{}", "body", "Invalid JSON"),  # a byte-order mark
    ],
)
def test_malformed_json_is_400_naming_the_field(client, content, field, expected_in_msg):
    t0 = time.perf_counter()
    r = _post_raw(client, "/recommend" if "requests" not in str(content) else "/recommend/batch", content)
    assert r.status_code == 400, r.text
    assert any(field in loc for loc in _locations(r)), r.text
    assert expected_in_msg in r.text, r.text
    assert time.perf_counter() - t0 < 5  # a hostile body costs little to refuse


def test_oversized_bodies_are_413_before_they_are_read(client):
    from stratarec.serving.models import MAX_BODY_BYTES

    big = b'{"user_id": 1, "exclude": [' + b"1," * (MAX_BODY_BYTES // 2) + b"1]}"
    r = _post_raw(client, "/recommend", big)
    assert r.status_code == 413 and _locations(r) == [["body"]] and str(MAX_BODY_BYTES) in r.json()["error"]

    def chunks():  # no Content-Length: the guard counts while it reads, and stops
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    r = _post_raw(client, "/recommend/batch", chunks())
    assert r.status_code == 413 and _locations(r) == [["body"]]
    r = client.post("/recommend", content=b"{}", headers={"content-type": "application/json", "content-length": "12abc"})
    assert 400 <= r.status_code < 500
    # The largest valid request still fits: a full batch of full exclude lists.
    full = {"requests": [{"user_id": 2**63 - 1, "k": 1000, "exclude": [2**63 - 1 - i for i in range(1000)]}] * 256}
    assert len(json.dumps(full)) < MAX_BODY_BYTES
    r = client.post("/recommend/batch", json=full)
    assert r.status_code == 200 and len(r.json()["responses"]) == 256


@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="user_id"\r\n\r\n1\r\n--x--\r\n'),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="user_id"; filename="../../etc/passwd"\r\n\r\nroot\r\n--x--\r\n',
        ),
        ("application/x-www-form-urlencoded", b"user_id=file%3A%2F%2F%2Fetc%2Fpasswd"),
        ("application/vnd.bentoml+pickle", b"\x80\x05K\x01."),
        ("text/plain", b'{"user_id": 1}'),
    ],
)
def test_only_json_bodies_are_accepted(client, content_type, content):
    """Multipart (spooled to disk, URL downloads), forms and pickle never reach BentoML's decoders."""
    r = _post_raw(client, "/recommend", content, content_type)
    assert r.status_code == 415, r.text
    assert _locations(r) == [["headers", "content-type"]] and "application/json" in r.json()["error"]


def test_nothing_a_client_sends_touches_files(client, log_dir, tmp_path):
    """Hostile values never name a file the service opens: the log directory holds only the service's own files."""
    for body in ({"user_id": 1, "exclude": [1, 2]}, {"user_id": 3}, {"user_id": 0, "k": 1000, "diversify": True}):
        assert client.post("/recommend", json=body).status_code == 200
    owned = tmp_path / "owned.jsonl"  # an absolute path outside the service's folders
    for body in ({"user_id": "../../x"}, {"user_id": 1, "request_log": str(owned)}, {"user_id": 1, "k": "/dev/zero"}):
        assert client.post("/recommend", json=body).status_code == 400
    assert not owned.exists()
    names = [p.name for p in log_dir.iterdir()]
    assert names and all(n.startswith("requests-") and n.endswith(".jsonl") for n in names), names


def test_service_still_healthy_after_the_abuse(client, released):
    assert client.get("/readyz").status_code == 200
    r = client.post("/recommend", json={"user_id": released["known_user"], "k": 3})
    assert r.status_code == 200 and r.json()["degraded"] is False and len(r.json()["items"]) == 3
