"""The check the fake Discord is held to (tests/fakes/discord_api.py) finds what Discord's API does not allow."""

from __future__ import annotations

from tests.fakes.discord_api import Exchange, spec_problems

MESSAGES = "/channels/100/messages"


def test_exchanges_outside_discords_published_api_are_found():
    typing = Exchange("POST", "/channels/100/typing", None, 204, None)
    assert spec_problems([typing]) == []
    bad_request = Exchange("POST", MESSAGES, {"content": 42}, 400, {"code": 50035, "message": "Invalid Form Body"})
    bad_answer = Exchange("POST", MESSAGES, {"content": "hi"}, 200, {"content": "hi"})
    unknown = Exchange("GET", "/guilds/1/members", None, 200, [])
    wrong_status = Exchange("DELETE", "/channels/100/messages/5", None, 200, None)
    [route, status, request, answer] = spec_problems([bad_request, bad_answer, unknown, wrong_status])
    assert route == "GET /guilds/1/members: a route the bot is not known to use (add it to ROUTES, from the spec)"
    assert status == "DELETE /channels/100/messages/5: answered 200, the spec says [204]"
    assert request.startswith(f"POST {MESSAGES} request: not a MessageCreateRequestSchema: content: Invalid input (invalid_type)")
    assert answer.startswith(f"POST {MESSAGES} answer 200: not a MessageResponseSchema: ")
