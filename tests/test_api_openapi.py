"""`/openapi.json` is a valid OpenAPI 3.1 document of every route, made from the models that validate the
requests; `/docs` is Swagger UI served from installed files."""

from __future__ import annotations

import re

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator

from api import create_app
from api.models.batches import BatchBody
from api.models.conversation import BeamBody, ChatBody, RerankBody
from api.models.generation import GenerationBody
from api.models.tokenizer import DetokenizeBody, TokenizeBody
from api.openai.models import ChatCompletionRequest, CompletionRequest
from api.openapi import server_limit_values, write_server_limits
from tests.tiny_tokenizer import tiny_tokenizer

NOT_DOCUMENTED = {"demo.static", "openapi.swagger_asset"}
"""Endpoints serving page assets (scripts, styles), which are not part of the API."""

REF = "#/components/schemas/{model}"


@pytest.fixture
def document(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.is_json
    return response.json


def openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(document).validate()


def test_every_route_and_method_is_documented(app, document):
    routes = [rule for rule in app.url_map.iter_rules() if rule.endpoint not in NOT_DOCUMENTED]
    assert len(routes) >= 14
    for rule in routes:
        operations = document["paths"].get(openapi_path(rule.rule))
        assert operations is not None, f"{rule.rule} is not in /openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in operations, f"{method} {rule.rule} is not in /openapi.json"
            assert operations[method.lower()]["responses"]


@pytest.mark.parametrize(("path", "model"), [
    ("/generate", GenerationBody), ("/stream", GenerationBody), ("/v1/completions", CompletionRequest),
    ("/v1/chat/completions", ChatCompletionRequest), ("/tokenize", TokenizeBody), ("/detokenize", DetokenizeBody),
    ("/chat", ChatBody), ("/stream_chat_beam", BeamBody), ("/rerank_scores", RerankBody),
    ("/generate_batch", BatchBody),
])
def test_request_bodies_are_the_validating_models_schemas(app, document, path, model):
    body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": REF.format(model=model.__name__)}
    expected = model.model_json_schema(ref_template=REF)
    expected.pop("$defs", None)
    with app.app_context():
        write_server_limits(expected, server_limit_values())
    assert document["components"]["schemas"][model.__name__] == expected
    assert expected["additionalProperties"] is False  # unknown fields are refused, and documented so


def numeric_limits(schema: dict) -> list[tuple[str, object]]:
    """(field, a value the schema forbids) for every bounded number or integer property."""
    cases = []
    for name, prop in schema["properties"].items():
        for option in prop.get("anyOf", [prop]):
            if option.get("type") not in ("integer", "number"):
                continue
            if "maximum" in option:
                cases.append((name, option["maximum"] + 1))
            if "minimum" in option:
                cases.append((name, option["minimum"] - 1))
            if "exclusiveMinimum" in option:
                cases.append((name, option["exclusiveMinimum"]))
    return cases


def test_the_documented_limits_are_the_enforced_ones(client, document, live_worker):
    live_worker("cpu")
    cases = numeric_limits(document["components"]["schemas"]["GenerationBody"])
    assert {name for name, _ in cases} >= {"max_tokens", "temperature", "top_k", "top_p", "seed"}
    for name, value in cases:
        response = client.post("/generate", json={"prompt": "hi", name: value})
        assert response.status_code == 400, (name, value)
        assert response.json["error"]["field"] == name


def test_limits_the_settings_choose_are_stated_with_this_servers_values(app_config):
    app = create_app({**app_config, "MAX_NEW_TOKENS_LIMIT": 50, "MAX_BATCH_PROMPTS": 3})
    schemas = app.test_client().get("/openapi.json").json["components"]["schemas"]
    for body in ("GenerationBody", "ChatBody", "BeamBody", "CompletionRequest", "BatchBody"):
        assert schemas[body]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 50, body
    assert schemas["ChatCompletionRequest"]["properties"]["max_completion_tokens"]["anyOf"][0]["maximum"] == 50
    assert schemas["BatchBody"]["properties"]["prompts"]["maxItems"] == 3
    assert schemas["DetokenizeBody"]["properties"]["ids"]["items"] == {
        "type": "integer", "minimum": 0, "exclusiveMaximum": tiny_tokenizer().get_vocab_size(with_added_tokens=True)}
    assert "x-server-limits" not in str(schemas)


CHAT = [{"role": "user", "content": "hi"}]

REFUSED_BODIES = [
    pytest.param("/tokenize", {}, id="tokenize-neither"),
    pytest.param("/tokenize", {"text": "a", "messages": CHAT}, id="tokenize-both"),
    pytest.param("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
                 id="options-without-stream"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "n": 2}, id="n-2"),
    pytest.param("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, id="presence-penalty"),
    pytest.param("/v1/completions", {"prompt": "hi", "echo": True}, id="echo"),
    pytest.param("/chat", {"messages": ["hi", {"role": "assistant", "content": "x"}]}, id="mixed-forms"),
    pytest.param("/chat", {"messages": [" \t"]}, id="blank-turn"),
    pytest.param("/detokenize", {"ids": [10**6]}, id="id-past-vocabulary"),
    pytest.param("/generate", {"prompt": "hi", "max_tokens": 65}, id="max-tokens-above-limit"),
    pytest.param("/generate_batch", {"prompts": ["hi"] * 65}, id="too-many-prompts"),
]


@pytest.mark.parametrize(("path", "body"), REFUSED_BODIES)
def test_a_body_the_api_refuses_is_one_the_document_forbids(client, document, live_worker, path, body):
    """The rules models check in code (not by pydantic's types) are stated in the schema too, so a client or a
    fuzzer reading the document learns them: only the context length and the order of turns cannot be."""
    live_worker("cpu")
    assert client.post(path, json=body).status_code == 400
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**schema, "components": document["components"]})
    assert not validator.is_valid(body)


def refs(*models: str) -> dict:
    """The document's schema of an event carrying one of `models`."""
    return {"$ref": REF.format(model=models[0])} if len(models) == 1 else {
        "anyOf": [{"$ref": REF.format(model=model)} for model in models]}


GENERATION_EVENTS = {"token": refs("TokenEvent"), "done": refs("DoneEvent"), "error": refs("ErrorBody")}


@pytest.mark.parametrize(("path", "events"), [
    ("/stream", GENERATION_EVENTS),
    ("/chat", GENERATION_EVENTS),
    ("/stream_chat_beam", {"candidates": refs("CandidatesEvent"), "token": refs("TokenEvent"),
                           "done": refs("BeamDoneEvent"), "error": refs("ErrorBody")}),
    ("/jobs/{job_id}/stream", {"token": refs("TokenEvent"),
                               "done": refs("DoneEvent", "BeamDoneEvent", "ScoreDoneEvent"),
                               "error": refs("ErrorBody"), "candidates": refs("CandidatesEvent")}),
])
def test_sse_routes_are_event_streams_with_their_event_shapes(document, path, events):
    method = "get" if path.startswith("/jobs/") else "post"
    ok = document["paths"][path][method]["responses"]["200"]
    stream = ok["content"]["text/event-stream"]
    assert stream["x-events"] == events
    assert "event: token" in stream["example"] or "event: candidates" in stream["example"]
    assert "X-Job-Id" in ok["headers"]


@pytest.mark.parametrize(("path", "answer", "chunk"), [
    ("/v1/completions", "Completion", "Completion"),
    ("/v1/chat/completions", "ChatCompletion", "ChatCompletionChunk"),
])
def test_openai_routes_document_both_answers_and_their_error_shape(document, path, answer, chunk):
    operation = document["paths"][path]["post"]
    content = operation["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": REF.format(model=answer)}
    assert content["text/event-stream"]["x-events"]["chunk"] == {"$ref": REF.format(model=chunk)}
    assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": REF.format(model="OpenAIErrorBody")}


def test_native_errors_are_documented_in_the_native_shape(document):
    error = document["paths"]["/generate"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": REF.format(model="ErrorBody")}
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"type", "message", "field"}


def local_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_docs_is_swagger_ui_from_installed_files(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "SwaggerUIBundle" in html and '"/openapi.json"' in html
    assets = local_assets(html)
    assert any(asset.endswith("swagger-ui-bundle.js") for asset in assets)
    for asset in assets:
        assert asset.startswith("/"), f"{asset} is not served by this server"
        response = client.get(asset)
        assert response.status_code == 200 and len(response.get_data()) > 100, asset
