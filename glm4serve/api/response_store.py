"""Responses kept for `previous_response_id` and GET /v1/responses/{id}: in memory, per server.

Each stored response keeps its whole context as items: the items of the responses it follows
(their inputs and outputs, in order) and then its own input. A follow-up is that context, the
response's output, and the new input; the chain never needs an older response that may have
gone. Items are shared, not copied, between the responses of a chain, but each is counted in
full against the budget, so the store holds at most its budget whatever is shared. The least
recently used response goes first when a new one does not fit.

Every item a stored response holds (its context and its output) can be found by its id, for the
`item_reference` input items that name one.

Kept in the HTTP process: with engine replicas (cluster.py) that is the one ingress, so every
replica's replies chain.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("glm4serve.api")


@dataclass
class StoredResponse:
    response: dict  # the response object as it was returned
    input_items: list[dict]  # the context it was made from: earlier responses' items, then its own input
    size: int  # bytes counted against the store's budget

    @property
    def context(self) -> list[dict]:
        """The items a response that follows this one starts from."""
        return self.input_items + self.response["output"]


class ResponseStore:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        # item id -> {id of a stored response holding an item of that id: its item}, in the order they were stored
        self._items: dict[str, dict[str, dict]] = {}

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._responses)

    def put(self, response: dict, input_items: list[dict]) -> bool:
        """Keep a response, dropping the least recently used ones it needs room from; False when
        it alone is over the budget (then nothing is dropped and it is not kept)."""
        size = len(json.dumps([response, input_items], ensure_ascii=False, separators=(",", ":")))
        if size > self.budget:
            log.warning("response %s (%d bytes) is over the response store's budget of %d bytes: not stored",
                        response["id"], size, self.budget)
            return False
        while self.used + size > self.budget:
            self.delete(next(iter(self._responses)))
        stored = StoredResponse(response, input_items, size)
        self._responses[response["id"]] = stored
        self.used += size
        for item in stored.context:
            self._items.setdefault(item["id"], {})[response["id"]] = item
        return True

    def item(self, item_id: str) -> dict | None:
        """The item of that id held by a stored response (its context or its output): the latest stored one's."""
        holders = self._items.get(item_id)
        return next(reversed(holders.values())) if holders else None

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._responses.pop(response_id, None)
        if stored is None:
            return False
        self.used -= stored.size
        for item in stored.context:
            holders = self._items.get(item["id"], {})
            holders.pop(response_id, None)
            if not holders:
                self._items.pop(item["id"], None)
        return True
