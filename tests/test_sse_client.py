"""The tests' and benchmarks' SSE reader: what it makes of our streams, keep-alives, and OpenAI-style streams."""

from __future__ import annotations

from tests.sse_client import SSEEvent, iter_events, parse_lines, parse_sse

BODY = (': keep-alive\n\n'
        'id: 1\nevent: token\ndata: {"text": "Hi"}\n\n'
        ': keep-alive\n\n'
        'id: 2\r\nevent: done\r\ndata: {"output_text":\r\ndata: "Hi"}\r\n\r\n')


class StreamedResponse:
    """What `iter_events` reads of a `requests` response: its lines as they arrive."""

    def __init__(self, body: str):
        self.body = body

    def iter_lines(self, decode_unicode: bool = False):
        yield from self.body.split("\n")


def test_a_body_gives_its_events_in_order_and_its_comments():
    events, comments = parse_sse(BODY)
    assert events == [{"id": 1, "event": "token", "data": {"text": "Hi"}},
                      {"id": 2, "event": "done", "data": {"output_text": "Hi"}}]  # data lines joined by "\n"
    assert comments == [": keep-alive", ": keep-alive"]


def test_a_streamed_response_gives_the_same_events_and_its_keep_alives():
    keepalives: list[str] = []
    events = list(iter_events(StreamedResponse(BODY), keepalives=keepalives))
    assert [(e.id, e.event) for e in events] == [(1, "token"), (2, "done")]
    assert events[1].data == {"output_text": "Hi"} and len(keepalives) == 2


def test_an_openai_stream_keeps_its_data_as_text():
    body = 'data: {"choices": []}\n\ndata: [DONE]\n\n'
    assert list(parse_lines(body.split("\n"), decode=None)) == [
        SSEEvent(None, "message", '{"choices": []}'), SSEEvent(None, "message", "[DONE]")]


def test_a_block_without_data_and_an_unfinished_block_are_not_events():
    assert list(parse_lines(["event: token", "", "id: 3", "event: token", 'data: {"a": 1}'])) == []
