"""What the API layer may ask of the engine (AsyncEngine is the implementation)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from .types import EngineStats, GuidedSpec, Output, SamplingParams

SHUTDOWN_TIMEOUT_S = 10.0  # how long shutdown() waits for the loop's last step


class EngineClient(Protocol):
    @property
    def is_alive(self) -> bool: ...

    @property
    def max_model_len(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def replica_stats(self) -> dict[str, EngineStats]:
        """Each engine replica's stats by name, when several serve behind this client; {} for one."""
        ...

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError, at once, for a request the engine would refuse: checked before a stream starts."""

    async def compile_guided(self, spec: GuidedSpec) -> None:
        """Compile (and cache) a grammar; ValueError when it cannot be compiled."""

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[Output]:
        """The request's Outputs; leaving the iteration early aborts it. EngineError when the engine fails it."""
        ...

    async def load_lora(self, name: str, path: str, replace: bool = False) -> None:
        """Serve the LoRA adapter in `path` as `name` (ValueError when it cannot be, or the name is taken
        and not `replace`d)."""

    async def unload_lora(self, name: str) -> None:
        """Serve `name` no more (KeyError when it is not served); its running requests finish with it."""

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop the request, or only its choice `index` (whose stream then ends it with 'abort')."""

    def shutdown(self, timeout: float | None = SHUTDOWN_TIMEOUT_S) -> None: ...
