"""/v1/conversations: conversations the server keeps, which a response continues and extends.

A conversation is a list of items in the shape GET /v1/responses/{id}/input_items lists them (messages,
calls and their outputs, each with an id): created with up to 20, added 20 at a time, and extended by every
response given `conversation`. That response starts from all of the conversation's items, as one given
`previous_response_id` starts from the stored context (the two are exclusive), and once it finishes
(completed, or incomplete at max_output_tokens) its input items and then its output items are appended,
whatever its `store`. A response that failed, or whose client left, adds nothing. Two responses on one
conversation at once each start from its items as they were, and append in the order they finish. An item
whose id another of the conversation has (or, for a response, one of its context) is refused, as OpenAI
refuses it: ids name one item each, for GET, DELETE and the pages' `after`.

In memory, per server, like stored responses (response_store.py), within --conversation-store-memory: the
least recently used conversations go first when an addition does not fit, and an addition that would put
one conversation alone over it is a 400 (a response that would, fails: it is neither added nor stored).
Kept in the HTTP process, so with engine replicas (cluster.py) every replica's replies extend the same
conversations.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError

from .body import Metadata, RequestBody
from .errors import APIError, invalid_request, validation_error
from .response_store import ResponseStore
from .responses_request import ItemReference, item_resources, new_id, parse_items

MAX_ITEMS_AT_ONCE = 20  # OpenAI's limit on items given to create a conversation, or to add at once
_NewItems = Annotated[list[dict[str, Any]], Field(max_length=MAX_ITEMS_AT_ONCE)]

log = logging.getLogger("glm4serve.api")


# ---- requests -------------------------------------------------------------------------------


class CreateConversationRequest(RequestBody):
    items: _NewItems | None = None
    metadata: Metadata | None = None


class UpdateConversationRequest(RequestBody):
    metadata: Metadata | None  # required, as OpenAI's; null clears it


class AddItemsRequest(RequestBody):
    items: Annotated[_NewItems, Field(min_length=1)]


def new_items(items: list[dict], responses: ResponseStore) -> list[dict]:
    """Items as a request gives them (response input items) -> as the conversation keeps them, each with an id. An
    item_reference is the item of that id in a stored response (a 400 when none holds it), as on /v1/responses."""
    try:
        parsed = parse_items(items)
    except ValidationError as e:
        raise _as_items_error(e) from None
    for i, item in enumerate(parsed):
        if isinstance(item, ItemReference):
            found = responses.item(item.id)
            if found is None:
                raise invalid_request(f"Item with id {item.id!r} not found.", f"items.{i}")
            parsed[i] = parse_items([found])[0]
    return item_resources(parsed)


def check_unique_ids(kept: list[dict], new: list[dict], param: str) -> list[dict]:
    """`new` items, unless one's id is another's or a `kept` item's (a 400, as OpenAI's)."""
    seen = {item["id"] for item in kept}
    for item in new:
        if item["id"] in seen:
            raise invalid_request(f"Duplicate item found with id {item['id']!r}. Remove duplicate items from your "
                                  "input and try again.", param)
        seen.add(item["id"])
    return new


def _as_items_error(e: ValidationError) -> APIError:
    """An item's error as this route names it: pydantic's paths start at the item's index ("items.0.role"), the
    items' own checks name the responses route's `input` (then "items.0")."""
    error = validation_error(RequestValidationError(e.errors()))
    loc = max(e.errors(), key=lambda x: len(x.get("loc", ()))).get("loc", ())
    if error.param is None or error.param == "input":
        param = f"items.{loc[0]}" if loc and isinstance(loc[0], int) else "items"
        return APIError(400, error.message, error.type, param)
    param = f"items.{error.param}"
    message = error.message
    if message.startswith(f"{error.param}: "):
        message = f"{param}: " + message.removeprefix(f"{error.param}: ")
    return APIError(400, message, error.type, param)


# ---- the store ------------------------------------------------------------------------------


@dataclass
class Conversation:
    id: str
    created_at: int
    metadata: dict[str, str]
    items: list[dict] = field(default_factory=list)
    size: int = 0  # bytes counted against the store's budget: its items' JSON and its metadata's

    @property
    def resource(self) -> dict:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}

    def item(self, item_id: str) -> dict:
        for item in self.items:
            if item["id"] == item_id:
                return item
        raise APIError(404, f"Item with id {item_id!r} not found in conversation {self.id!r}.",
                       "invalid_request_error", code="not_found")


def _size(value) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class ConversationStore:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._conversations)

    def create(self, metadata: dict[str, str], items: list[dict]) -> Conversation:
        if self.budget <= 0:
            raise APIError(400, "This server keeps no conversations (--conversation-store-memory 0).",
                           "invalid_request_error")
        check_unique_ids([], items, "items")
        conversation = Conversation(new_id("conv"), int(time.time()), metadata, list(items))
        size = _size(metadata) + sum(map(_size, items))
        self._check_fits(size, "items")  # before room is made: a refused conversation drops no other
        self._conversations[conversation.id] = conversation
        self._grow(conversation, size, "items")
        return conversation

    def get(self, conversation_id: str) -> Conversation | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is not None:
            self._conversations.move_to_end(conversation_id)
        return conversation

    def find(self, conversation_id: str, param: str | None = None) -> Conversation:
        """A kept conversation, else a 404 (naming `param`, the request's field that named it)."""
        conversation = self.get(conversation_id)
        if conversation is None:
            raise APIError(404, f"Conversation with id {conversation_id!r} not found.", "invalid_request_error",
                           param, "not_found")
        return conversation

    def kept(self, conversation: Conversation) -> bool:
        """Whether the conversation is still here (not deleted, nor dropped for room)."""
        return self._conversations.get(conversation.id) is conversation

    def add(self, conversation: Conversation, items: list[dict], param: str = "items") -> None:
        """Items appended, unless one's id is another's (a 400 naming `param`, as is a conversation that would be
        over the whole budget)."""
        check_unique_ids(conversation.items, items, param)
        if items:
            self._grow(conversation, sum(map(_size, items)), param)
            conversation.items += items
            self._conversations.move_to_end(conversation.id)

    def check_room(self, conversation: Conversation, items: list[dict], param: str) -> None:
        """add()'s refusals, early: an id already there, or a conversation over the whole budget."""
        check_unique_ids(conversation.items, items, param)
        self._check_fits(conversation.size + sum(map(_size, items)), param)

    def update(self, conversation: Conversation, metadata: dict[str, str]) -> None:
        self._grow(conversation, _size(metadata) - _size(conversation.metadata), "metadata")
        conversation.metadata = metadata

    def delete_item(self, conversation: Conversation, item_id: str) -> None:
        item = conversation.item(item_id)
        conversation.items.remove(item)
        self._grow(conversation, -_size(item), "items")

    def delete(self, conversation_id: str) -> None:
        gone = self._conversations.pop(conversation_id)
        self.used -= gone.size

    def _check_fits(self, size: int, param: str) -> None:
        if size > self.budget:
            raise invalid_request(f"The conversation would be {size} bytes, over the server's "
                                  f"--conversation-store-memory of {self.budget} bytes.", param)

    def _grow(self, conversation: Conversation, change: int, param: str) -> None:
        """Count `change` more bytes for a kept conversation, dropping the least recently used others while
        they do not fit; a 400 naming `param` when it alone would be over the budget."""
        self._check_fits(conversation.size + change, param)
        for other in list(self._conversations.values()):  # least recently used first
            if self.used + change <= self.budget:
                break
            if other is not conversation:
                log.warning("conversation %s dropped: --conversation-store-memory is full", other.id)
                self.delete(other.id)
        conversation.size += change
        self.used += change


def list_page(items: list[dict], limit: int, order: str, after: str | None, what: str) -> dict:
    """A page of items in OpenAI's list shape, `after` the item of that id (in `order`)."""
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"No item with id {after!r} in this {what}.", "invalid_request_error", "after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
