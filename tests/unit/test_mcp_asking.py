"""Which call a bridged server's request or log message goes to (``sidecars.mcp._asking``)."""

from __future__ import annotations

import asyncio

import mcp_types as types
import pytest

from plugins_sdk.serving import Event
from sidecars.mcp._asking import ROOTS, SAMPLING, CallSlot, InFlight, Refused, capabilities
from sidemesh.v1 import mcp_pb2


def slot(tool: str, *methods: str, interactive: bool = True) -> tuple[CallSlot, list[Event]]:
    events: list[Event] = []

    async def emit(event: Event) -> None:
        events.append(event)

    def offer(event: Event) -> bool:
        events.append(event)
        return True

    return CallSlot(tool, frozenset(methods), emit, offer, interactive=interactive), events


def test_no_call_in_flight_means_no_one_can_answer() -> None:
    with pytest.raises(Refused) as refused:
        InFlight("p").for_request(SAMPLING)
    assert refused.value.code == types.METHOD_NOT_FOUND
    assert "no call is in flight" in refused.value.message


def test_the_only_request_in_flight_gets_the_request_if_it_can_answer() -> None:
    in_flight = InFlight("p")
    asker, _ = slot("asker", SAMPLING)
    in_flight._calls.append(asker)
    assert in_flight.for_request(SAMPLING) is asker
    assert in_flight.for_log() is asker
    with pytest.raises(Refused, match="did not declare that it can answer roots/list"):
        in_flight.for_request(ROOTS)
    plain_flight = InFlight("p")
    plain_flight._calls.append(slot("plain", interactive=False)[0])
    with pytest.raises(Refused, match="cannot answer roots/list: it made the plain CallTool"):
        plain_flight.for_request(ROOTS)


def test_with_several_requests_in_flight_nothing_is_guessed() -> None:
    """A plain call and an asking one: the request may be the plain call's; a call and
    another client's unsubscribe: the log may be the unsubscribe's."""
    in_flight = InFlight("p")
    in_flight._calls += [slot("plain", interactive=False)[0], slot("asker", SAMPLING)[0]]
    with pytest.raises(Refused) as refused:
        in_flight.for_request(SAMPLING)
    assert refused.value.code == types.INTERNAL_ERROR
    assert "2 requests are in flight" in refused.value.message
    assert in_flight.for_log() is None
    one_call = InFlight("p")
    one_call._calls.append(slot("asker", SAMPLING)[0])
    with one_call.request():  # e.g. resources/unsubscribe for another client
        assert one_call.for_log() is None
        with pytest.raises(Refused, match="2 requests are in flight"):
            one_call.for_request(SAMPLING)
    assert one_call.for_log() is not None


async def test_the_current_call_answers_and_logs_go_to_it() -> None:
    in_flight = InFlight("p")
    other, _ = slot("other", SAMPLING)
    mine, events = slot("mine", SAMPLING)
    in_flight._calls.append(other)
    with in_flight.call(mine):  # the 2026 case: the SDK asks within the call's own task
        assert in_flight.for_request(SAMPLING) is mine
        assert in_flight.for_log() is mine
        asked = asyncio.ensure_future(mine.ask(SAMPLING, {"maxTokens": 5}))
        await asyncio.sleep(0)
        kind, request = events[-1]
        assert kind == "server_request" and isinstance(request, mcp_pb2.McpServerRequest)
        answer = mcp_pb2.McpClientAnswer(id=request.id)
        answer.result.update({"model": "m"})
        mine.answer(answer)
        assert await asked == {"model": "m"}
    assert in_flight.for_log() is other  # the only call left in flight


async def test_an_answer_can_be_an_error_and_the_end_of_the_call_fails_what_waits() -> None:
    mine, events = slot("mine", SAMPLING)
    refused = asyncio.ensure_future(mine.ask(SAMPLING, {}))
    await asyncio.sleep(0)
    request = events[-1][1]
    answer = mcp_pb2.McpClientAnswer(id=request.id)  # type: ignore[attr-defined]
    answer.error.code, answer.error.message = -1, "the user said no"
    mine.answer(answer)
    with pytest.raises(Refused, match="the user said no"):
        await refused
    waiting = asyncio.ensure_future(mine.ask(SAMPLING, {}))
    await asyncio.sleep(0)
    mine.close()
    with pytest.raises(Refused, match="the call ended"):
        await waiting


def test_declared_capabilities() -> None:
    declared = mcp_pb2.McpClientCapabilities(sampling=True, roots=True)
    assert capabilities(declared) == {SAMPLING, ROOTS}
