"""Commands to the device through one table: ``name -> handler(body) -> reply fields``.

The MQTT surface (``<base>/cmd/<name>``) only parses the payload and calls the handler; what a
command does lives in the agent's public methods (``Agent.start_sample`` ...), so that other front
ends (a local web page) call the very same code. To add a command, put a handler in the table::

    agent.commands["update_model"] = lambda body: {"bundle": install(body["url"])}

A handler gets the payload's JSON object (``{}`` when the payload is empty) and returns the fields of
its reply as a dict; to refuse, it raises ``ValueError``, ``TypeError`` or ``UserError`` with one line
saying what to send instead. ``ok``, ``command`` and ``request_id`` are added here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING, Callable

from edge.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from edge.agent import Agent

log = logging.getLogger(__name__)

#: A command's handler: the payload's JSON object in, the reply's fields out; raises to refuse.
CommandHandler = Callable[[dict], dict]
#: Sample ids and ``reply_to`` names: they become topic levels, so no '/', '+' or '#'.
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: What the error for an unparsable payload suggests, per command (any object will do for the others).
EXAMPLES = {"start_sample": '{"sample_id": "BM-42"}', "reload_model": '{"bundle": "/path/to/bundle"}'}


def iso_now() -> str:
    """The current time as every payload writes it: ISO 8601, UTC, milliseconds."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def agent_commands(agent: "Agent") -> dict[str, CommandHandler]:
    """The agent's own commands; each is a thin wrapper around one of its public methods."""

    def start_sample(body: dict) -> dict:
        sample_id = body.get("sample_id")
        if not isinstance(sample_id, str) or not SAFE_NAME.fullmatch(sample_id):
            raise ValueError('start_sample needs sample_id: 1-64 letters, digits, ".", "_" or "-", e.g. {"sample_id": "BM-42"}')
        closed = agent.start_sample(sample_id)
        return {"sample_id": sample_id, "closed": closed}

    def reload_model(body: dict) -> dict:
        bundle = body.get("bundle")
        if bundle is not None and not isinstance(bundle, str):
            raise ValueError('bundle must be a path string, e.g. {"bundle": "/path/to/bundle"}')
        return agent.reload_model(bundle)

    return {
        "ping": lambda body: {"time": iso_now()},
        "start_sample": start_sample,
        "stop_sample": lambda body: {"summary": agent.stop_sample()},
        "summary": lambda body: {"summary": agent.current_summary()},
        "snapshot": lambda body: {"folder": str(agent.request_snapshot())},
        "reload_model": reload_model,
    }


def parse_body(name: str, payload: bytes) -> dict:
    """The payload as a JSON object (empty payload: ``{}``); one line naming what to send otherwise."""
    example = EXAMPLES.get(name, "{}")
    try:
        body = json.loads(payload.decode("utf-8")) if payload.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"payload is not valid UTF-8 JSON; send a JSON object such as {example}") from None
    if not isinstance(body, dict):
        raise ValueError(f"payload must be a JSON object such as {example}")
    return body


def answer(commands: dict[str, CommandHandler], name: str, payload: bytes) -> tuple[str, dict]:
    """(reply name, reply) for one command; never raises for anything a sender can put in a message.

    The reply name is ``reply_to`` from the body when it is a safe name, else the command's name.
    """
    shown = name[:64]
    reply_to = re.sub(r"[^A-Za-z0-9._-]", "_", shown) or "unknown"
    request_id = None
    try:
        body = parse_body(name, payload)
        request_id = body.get("request_id") if isinstance(body.get("request_id"), (str, int)) else None
        if isinstance(body.get("reply_to"), str) and SAFE_NAME.fullmatch(body["reply_to"].replace("/", "_")):
            reply_to = body["reply_to"]
        handler = commands.get(name)
        if handler is None:
            raise ValueError(f"unknown command {shown!r}; use {', '.join(sorted(commands))}")
        reply = {"ok": True, "command": name, "request_id": request_id, **handler(body)}
    except (ValueError, TypeError, UserError) as error:
        log.warning("command %r refused: %s", shown, error)
        reply = {"ok": False, "command": shown, "request_id": request_id, "error": str(error) or type(error).__name__}
    return reply_to, reply
