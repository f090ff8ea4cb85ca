"""Several engine replicas behind one server, on Ray Serve (`glm4serve serve --num-replicas N`).

Ray Serve deploys the replicas, health-checks and restarts them, and routes between them; the same
code runs on a laptop (a local Ray started here) and on a KubeRay cluster (`--ray-address`, or a
RayService whose serveConfigV2 imports `glm4serve.cluster:app`). The application:

- `EngineReplica` (N replicas): each a full engine, its own model and KV cache (an AsyncEngine, as
  the single-process server runs). One GPU each on CUDA; on CPU the cores are split between them.
- `Ingress` (1 replica): the same FastAPI app and routes as the single-process server, over a
  `ReplicaClient` (the EngineClient the API types against) that streams from the replicas through a
  Serve handle. Its `PrefixAffinityRouter` sends a prompt to the replica that holds the longest run
  of its first KV blocks, unless that replica is clearly busier than another.
- `StatsBoard` (1 replica): each engine replica reports its EngineStats there every second; /health
  (up while one replica reports) and /metrics (a `replica` label on every engine series) read it.

Nothing here is imported unless the server runs replicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from .api.app import create_app
from .api.settings import ServerSettings
from .engine.async_engine import AsyncEngine
from .engine.block_pool import hash_block, hash_root
from .engine.client import SHUTDOWN_TIMEOUT_S
from .engine.guided import Grammars
from .engine.types import EngineError, EngineStats, GuidedSpec, Output, SamplingParams
from .model.tokenizer import Tokenizer

log = logging.getLogger("glm4serve")

STATS_PERIOD_S = 1.0  # replicas report this often; one silent for STALE_AFTER_S counts as down
STALE_AFTER_S = 5.0
BUSIER_BY = 4  # requests in flight beyond the least busy replica's: then affinity gives way
ABORT_TIMEOUT_S = 10.0  # a replica that does not answer an abort by then is left to end the choice with its request
AFFINITY_BLOCKS = 1 << 16  # block hashes remembered by the router (least recently routed forgotten)


@dataclass
class EngineRequest:
    """One generate call as it crosses to a replica (its first argument, which the router reads)."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    block_hashes: list[bytes]  # chain hashes of the prompt's full KV blocks, for routing


# ---- the engine replicas ---------------------------------------------------------------------


@serve.deployment
class EngineReplica:
    def __init__(self, settings: ServerSettings, board):
        import torch

        from .server import build_llm_engine

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
        args = settings.engine_args()
        self.engine = AsyncEngine.start(lambda: build_llm_engine(args))
        self.name = serve.get_replica_context().replica_id.unique_id
        threading.Thread(target=self._report, args=(board,), name="glm4serve-stats", daemon=True).start()

    async def generate(self, request: EngineRequest) -> AsyncIterator[Output]:
        async for out in self.engine.generate(request.prompt_ids, request.params, request.request_id):
            yield out

    def abort(self, request_id: str, index: int | None = None) -> None:
        """The engine's abort, ignored by the replicas not running the request (every replica hears it)."""
        self.engine.abort(request_id, index)

    def info(self) -> dict:
        return {"max_model_len": self.engine.max_model_len, "replica": self.name}

    def _report(self, board) -> None:
        while self.engine.is_alive:
            try:
                board.put.remote(self.name, self.engine.stats()).result()
            except Exception:  # noqa: BLE001 - the board restarts too; report again next period
                log.debug("stats report failed", exc_info=True)
            time.sleep(STATS_PERIOD_S)

    def __del__(self):  # Serve stops the replica: stop its engine loop (once its requests are done)
        if hasattr(self, "engine"):
            self.engine.shutdown()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class StatsBoard:
    def __init__(self):
        self._stats: dict[str, tuple[float, EngineStats]] = {}

    def put(self, replica: str, stats: EngineStats) -> None:
        self._stats[replica] = (time.monotonic(), stats)

    def get(self) -> dict[str, EngineStats]:
        """The replicas heard from lately."""
        now = time.monotonic()
        self._stats = {r: (t, s) for r, (t, s) in self._stats.items() if now - t < STALE_AFTER_S}
        return {r: s for r, (_, s) in self._stats.items()}


# ---- routing ---------------------------------------------------------------------------------


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Keeps prompts that share their first KV blocks (a system prompt, tools, the conversation so far)
    on the replica that computed them, so its prefix cache serves them: the replica that routed the
    longest run of the prompt's leading block hashes, when they cover half of the prompt's full
    blocks and that replica has at most BUSIER_BY more requests in flight than the least busy one.
    Anything else goes to the least busy replica."""

    def initialize_state(self, **kwargs) -> None:
        self._owner: OrderedDict[bytes, object] = OrderedDict()  # block hash -> ReplicaID

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        candidate_replicas = random.sample(candidate_replicas, len(candidate_replicas))  # ties: any of them
        loads = await asyncio.gather(*(self._load(r) for r in candidate_replicas))
        by_load = [r for _, r in sorted(zip(loads, candidate_replicas), key=lambda p: p[0])]
        owner, covered = self._longest_owner(pending_request, candidate_replicas)
        if owner is not None and covered:
            load = dict(zip((r.replica_id for r in candidate_replicas), loads))
            if load[owner.replica_id] <= load[by_load[0].replica_id] + BUSIER_BY:
                return [[owner], [r for r in by_load if r is not owner]]
        return [[r] for r in by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        for h in _block_hashes(pending_request):
            self._owner[h] = replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > AFFINITY_BLOCKS:
            self._owner.popitem(last=False)

    def _longest_owner(self, pending_request, candidates) -> tuple[RunningReplica | None, bool]:
        hashes = _block_hashes(pending_request)
        by_id = {r.replica_id: r for r in candidates}
        owner, run = None, 0
        for h in hashes:  # chain hashes: a match at block i means blocks 0..i all match
            replica = by_id.get(self._owner.get(h))
            if replica is None:
                break
            owner, run = replica, run + 1
        return owner, bool(hashes) and 2 * run >= len(hashes)

    @staticmethod
    async def _load(replica: RunningReplica) -> int:
        try:
            return await replica.get_queue_len(deadline_s=1.0)
        except Exception:  # noqa: BLE001 - an unreachable replica counts as the busiest
            return 1 << 30


def _block_hashes(pending_request: PendingRequest | None) -> list[bytes]:
    # Duck-typed, not isinstance: Ray Serve loads this module more than once in the ingress's process,
    # so the request's EngineRequest may be another copy of the class than this module's.
    args = getattr(pending_request, "args", None) or ()
    hashes = getattr(args[0], "block_hashes", None) if args else None
    return hashes if isinstance(hashes, list) else []


# ---- the ingress -----------------------------------------------------------------------------


def prompt_block_hashes(prompt_ids: list[int], block_size: int, lora: str | None,
                        salt: str | None = None) -> list[bytes]:
    """The chain hashes of a prompt's full blocks, as the engine's prefix cache keys them (sequence.py)."""
    hashes, parent = [], hash_root(lora, salt)
    for i in range(len(prompt_ids) // block_size):
        parent = hash_block(parent, prompt_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class ReplicaClient:
    """The EngineClient of the API layer (engine/client.py) over the engine replicas."""

    def __init__(self, replicas, board, settings: ServerSettings, tokenizer: Tokenizer, max_model_len: int):
        from .engine.engine import check_request_limits

        self._replicas, self._board = replicas, board
        self._settings, self._tokenizer = settings, tokenizer
        self.max_model_len = max_model_len
        limits = settings.scheduler_config(max_model_len, "cpu")  # for requests' limits: each replica steps its own
        loras = frozenset(settings.lora_modules)
        self._check = lambda ids, params: check_request_limits(ids, params, tokenizer.vocab_size, limits, loras)
        self._grammars = Grammars(tokenizer)  # a schema is checked here; each replica compiles its own
        self._streams: dict[str, object] = {}
        self._replica_stats: dict[str, EngineStats] = {}
        self._choice_ends: set[asyncio.Task] = set()  # broadcasts in flight (held: the loop keeps weak references)

    def refresh(self) -> None:
        """Read the replicas' reports (the ingress does, every STATS_PERIOD_S)."""
        self._replica_stats = self._board.get.remote().result()

    @property
    def is_alive(self) -> bool:
        return bool(self._replica_stats)

    def replica_stats(self) -> dict[str, EngineStats]:
        return dict(self._replica_stats)

    def stats(self) -> EngineStats:
        return EngineStats.total(self._replica_stats.values(), alive=self.is_alive)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self._check(prompt_ids, params)

    async def compile_guided(self, spec: GuidedSpec) -> None:
        await self._grammars.compile_async(spec)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Output]:
        request_id = request_id or os.urandom(16).hex()
        self.check_request(prompt_ids, params)
        hashes = prompt_block_hashes(prompt_ids, self._settings.block_size, params.lora, params.cache_salt)
        stream = self._replicas.options(stream=True).generate.remote(
            EngineRequest(list(prompt_ids), params, request_id, hashes))
        self._streams[request_id] = stream
        finished = False
        try:
            async for out in stream:
                yield out
            finished = True
        except ray.exceptions.RayTaskError as e:
            # The engine's own refusal or failure, raised as one engine raises it (a ConstraintError is a
            # 400), not as Ray's copy whose text is the replica's traceback.
            if isinstance(e.cause, (ValueError, EngineError)):
                raise e.cause from None
            log.warning("request %s failed on its replica: %s", request_id, e)
            # a cause Ray could not carry is a RayError whose text is the traceback: its name says enough
            detail = type(e.cause).__name__ if isinstance(e.cause, ray.exceptions.RayError) else repr(e.cause)
            raise EngineError(f"request {request_id} failed on its replica: {detail}") from e
        except (ray.exceptions.RayError, RuntimeError) as e:  # the replica died
            raise EngineError(f"request {request_id} failed on its replica: {e}") from e
        finally:
            # A stream left before its end (the server's deadline, a failed sibling prompt) stops on its
            # replica too; the API's abort comes after this and finds it gone.
            if self._streams.pop(request_id, None) is not None and not finished:
                with contextlib.suppress(Exception):  # one never routed re-raises its routing error here
                    stream.cancel()

    async def load_lora(self, name: str, path: str, replace: bool = False) -> None:
        raise ValueError("runtime LoRA updating needs one engine: replicas serve their --lora-modules")

    async def unload_lora(self, name: str) -> None:
        raise ValueError("runtime LoRA updating needs one engine: replicas serve their --lora-modules")

    def abort(self, request_id: str, index: int | None = None) -> None:
        if index is not None:  # one choice: the request's stream goes on for its siblings
            if request_id in self._streams:
                task = asyncio.get_running_loop().create_task(self._end_choice(request_id, index))
                self._choice_ends.add(task)
                task.add_done_callback(self._choice_ends.discard)
            return
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.cancel()  # the replica's generator is cancelled, which aborts the request there

    async def _end_choice(self, request_id: str, index: int) -> None:
        """A Serve handle routes a call to a replica of its router's choosing, not to the one running the
        request: the abort goes to every replica (the choices that end early are few)."""
        try:
            results = await self._replicas.broadcast("abort", request_id, index).results_async(
                timeout_s=ABORT_TIMEOUT_S, return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - no replica reached (all restarting): the choice ends with its request
            log.warning("ending choice %d of %s failed: %s", index, request_id, e)
            return
        for result in results:
            if isinstance(result, Exception):
                log.warning("ending choice %d of %s on a replica failed: %s", index, request_id, result)

    def shutdown(self, timeout: float | None = SHUTDOWN_TIMEOUT_S) -> None:
        pass  # Serve stops the replicas


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP app of the single-process server, built on this replica (__serve_build_asgi_app__)
    over a ReplicaClient that connects once the first engine replica answers."""

    def __init__(self, settings: ServerSettings, replicas, board):
        from .server import resolve_model

        self.settings, self.replicas, self.board = settings, replicas, board
        self.tokenizer = Tokenizer.from_dir(resolve_model(settings.model))
        self.model_name = settings.model_name

    def __serve_build_asgi_app__(self):
        s = self.settings
        app = create_app(None, self.tokenizer, s, self.model_name, max_model_len=1)  # /health: 503 until connected
        app.state.gate.capacity = s.num_replicas * s.max_num_seqs + s.max_waiting_requests
        threading.Thread(target=self._connect, args=(app.state.serving,), name="glm4serve-connect",
                         daemon=True).start()
        return app

    def _connect(self, ctx) -> None:
        info = self.replicas.info.remote().result()  # waits for the first replica to be up
        client = ReplicaClient(self.replicas, self.board, self.settings, self.tokenizer, info["max_model_len"])
        ctx.max_model_len = info["max_model_len"]
        ctx.engine = client
        while True:
            try:
                client.refresh()
            except Exception:  # noqa: BLE001 - the board restarts too; health reads the last reports
                log.debug("reading the stats board failed", exc_info=True)
            time.sleep(STATS_PERIOD_S)


def build_application(settings: ServerSettings):
    """The Serve application: the ingress over N engine replicas and the stats board."""
    import torch

    gpu = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    resources = {"num_gpus": 1} if gpu else {"num_cpus": max(1, (os.cpu_count() or 1) // settings.num_replicas)}
    replicas = EngineReplica.options(
        num_replicas=settings.num_replicas, ray_actor_options=resources,
        max_ongoing_requests=settings.max_num_seqs + settings.max_waiting_requests,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_seconds,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
    )
    board = StatsBoard.bind()
    return Ingress.bind(settings, replicas.bind(settings, board), board)


def app(args: dict):
    """Application builder for a RayService's serveConfigV2 (`import_path: glm4serve.cluster:app`):
    its `args` are the server's settings (the same keys as a YAML config)."""
    return build_application(ServerSettings(**args))


def check_before_deploying(settings: ServerSettings) -> None:
    """What every replica would refuse, refused once here (ValueError, OSError) before Ray starts."""
    if settings.lora_modules:
        from .model.config import ModelConfig
        from .model.lora import check_adapters
        from .server import resolve_model

        check_adapters(settings.lora_modules,
                       ModelConfig.from_dir(resolve_model(settings.model), settings.hf_overrides))


def serve_replicated(settings: ServerSettings) -> int:
    """`glm4serve serve --num-replicas N`: start (or join) Ray, run the application on host:port until
    SIGTERM or Ctrl-C, then let Serve drain the replicas and stop."""
    if settings.ray_address:
        ray.init(address=settings.ray_address)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)  # a new one, always
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name="glm4serve", route_prefix="/",
              logging_config={"log_level": "WARNING"})  # not a line per request and stats report
    log.info("serving %d engine replicas on http://%s:%d", settings.num_replicas, settings.host, settings.port)
    stop.wait()
    log.info("stopping: the replicas finish their requests for up to %.0f s", settings.graceful_shutdown_seconds)
    serve.delete("glm4serve")  # the replicas drain (graceful_shutdown_timeout_s), then Serve itself stops
    serve.shutdown()
    ray.shutdown()
    return 0
