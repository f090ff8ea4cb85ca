"""LoRA adapters loaded and unloaded while the server runs: vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter, with its bodies and replies, served when the server was started with
--allow-runtime-lora-updating (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).

The adapters a request's `model` may name are `ServingContext.loras`, changed one load or unload at a
time: a name joins it once the engine serves it and leaves it before the engine lets it go. A request
that passed its check by name just before the unload is refused by the engine: a 400, or when it
streams, an error event after the 200 (the engine takes a request once its stream has begun).
Requests running with an adapter that is unloaded or replaced finish with it.
"""

from __future__ import annotations

import asyncio

from fastapi.responses import PlainTextResponse

from .body import RequestBody
from .errors import APIError, invalid_request
from .serving import ServingContext


class LoadLoRAAdapterRequest(RequestBody):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter of this name (vLLM's field)


class UnloadLoRAAdapterRequest(RequestBody):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; adapters here are known by name alone


async def load_lora_adapter(ctx: ServingContext, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
    _check_allowed(ctx)
    name, path = body.lora_name, body.lora_path
    if not name or not path:
        raise invalid_request("Both 'lora_name' and 'lora_path' must be provided.")
    if name == ctx.model_name or name in ctx.settings.model_aliases:
        raise invalid_request(f"'{name}' is the served model's name: an adapter needs another", "lora_name")
    await asyncio.shield(_load(ctx, name, path, body.load_inplace))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(ctx: ServingContext, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
    _check_allowed(ctx)
    await asyncio.shield(_unload(ctx, body.lora_name))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# Shielded: a client that leaves mid-change must not leave the engine and `ctx.loras` apart.

async def _load(ctx: ServingContext, name: str, path: str, replace: bool) -> None:
    async with ctx.lora_updates:
        if name in ctx.loras and not replace:
            raise invalid_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        ctx.check_ready()
        try:
            await ctx.engine.load_lora(name, path, replace=replace)
        except ValueError as e:
            raise invalid_request(str(e), "lora_path") from None
        ctx.loras[name] = path


async def _unload(ctx: ServingContext, name: str) -> None:
    async with ctx.lora_updates:
        if name not in ctx.loras:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "invalid_request_error", "lora_name")
        ctx.check_ready()
        del ctx.loras[name]
        await ctx.engine.unload_lora(name)


def _check_allowed(ctx: ServingContext) -> None:
    if not ctx.settings.allow_runtime_lora_updating:
        raise APIError(404, "Loading and unloading LoRA adapters at runtime is off: start the server with "
                            "--allow-runtime-lora-updating.", "invalid_request_error")
