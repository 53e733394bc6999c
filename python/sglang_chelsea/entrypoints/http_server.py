"""The HTTP server: SGLang's native endpoints and the OpenAI-compatible ones (FastAPI).

``create_app`` builds the FastAPI app around a TokenizerManager; ``launch_server`` starts
the subprocesses, serves with uvicorn, watches the subprocesses (a dead one makes the
server unhealthy and exit) and stops everything on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from sglang_chelsea.entrypoints.auth import APIKeyMiddleware
from sglang_chelsea.entrypoints.chat_template import load_chat_template
from sglang_chelsea.entrypoints.http_errors import error_body, error_response, read_json_body
from sglang_chelsea.entrypoints.openai_api import OpenAIServing
from sglang_chelsea.entrypoints.sse import SSE_DONE, sse_data, sse_response
from sglang_chelsea.entrypoints.subprocesses import ServerProcesses, launch_subprocesses
from sglang_chelsea.entrypoints.tokenize_api import TokenizeServing
from sglang_chelsea.managers.generate_request import GenerateReqInput
from sglang_chelsea.managers.tokenizer_manager import (
    ServerDeadError,
    first_result,
    TokenizerManager,
)
from sglang_chelsea.metrics.collector import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sglang_chelsea.port_args import PortArgs
from sglang_chelsea.server_args import ServerArgs
from sglang_chelsea.utils.log_config import configure_logger

logger = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 1.0


def create_app(tm: TokenizerManager, server_args: ServerArgs) -> FastAPI:
    """The FastAPI app serving ``tm`` (add the API key check when ``server_args.api_key``)."""
    app = FastAPI(title="sglang-chelsea", docs_url=None, redoc_url=None, openapi_url=None)
    openai = OpenAIServing(tm, load_chat_template(server_args.chat_template, tm.tokenizer),
                           server_args.tool_call_parser, server_args.reasoning_parser)
    tokenize = TokenizeServing(tm.tokenizer, tm.vocab_size, tm.context_len)
    if server_args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=server_args.api_key)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("error serving %s", request.url.path)
        return error_response(f"internal server error: {exc}", 500)

    async def internal_state() -> dict[str, Any]:
        if not tm.healthy:
            raise ServerDeadError(tm.dead_reason)
        return await tm.get_internal_state()

    # ------------------------------------------------------------------ health and info
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if tm.healthy else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return Response(status_code=200 if await tm.health_generate() else 503)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info() -> dict[str, Any]:
        model_path = server_args.model_path or tm.model_path
        return {"model_path": model_path,
                "tokenizer_path": server_args.tokenizer_path or model_path,
                "is_generation": True, "served_model_name": tm.served_model_name,
                "weight_version": "default"}

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> Response:
        try:
            state = await internal_state()
        except (ServerDeadError, TimeoutError) as exc:
            return error_response(f"scheduler unavailable: {exc}", 503)
        info = server_args.to_dict()
        info.update(state)
        info["internal_states"] = [state]
        info["version"] = _version()
        return JSONResponse(info)

    @app.get("/get_load")
    async def get_load() -> Response:
        try:
            s = await internal_state()
        except (ServerDeadError, TimeoutError) as exc:
            return error_response(f"scheduler unavailable: {exc}", 503)
        kv = s["kv_cache"]
        in_use = kv["used_slots"] - kv["evictable_slots"]
        return JSONResponse([{
            "dp_rank": 0, "num_reqs": s["num_running_reqs"] + s["num_waiting_reqs"],
            "num_waiting_reqs": s["num_waiting_reqs"],
            "num_tokens": in_use + s["num_waiting_tokens"]}])

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            tm.metrics.update_scheduler_state(await internal_state())
        except (ServerDeadError, TimeoutError):
            pass  # counters still render
        return Response(tm.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # ------------------------------------------------------------------ control
    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        try:
            if not tm.healthy:
                raise ServerDeadError(tm.dead_reason)
            result = await tm.flush_cache()
        except (ServerDeadError, TimeoutError) as exc:
            return error_response(f"scheduler unavailable: {exc}", 503)
        if not result.success:
            return error_response(result.message, 400)
        return PlainTextResponse(result.message + "\n")

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        try:
            body = await read_json_body(request)
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
            if not isinstance(rid, str) or not isinstance(abort_all, bool):
                raise ValueError("rid must be a string and abort_all a boolean")
            if not rid and not abort_all:
                raise ValueError("rid is required (or abort_all: true)")
        except ValueError as exc:
            return error_response(str(exc))
        tm.abort_request(rid, abort_all)
        return Response(status_code=200)

    # ------------------------------------------------------------------ generation
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        try:
            obj = GenerateReqInput.from_dict(await read_json_body(request))
            prepared = tm.prepare_request(obj)
        except ServerDeadError as exc:
            return error_response(str(exc), 503)
        except ValueError as exc:
            return error_response(str(exc))
        gen = tm.generate_request(obj, prepared, request)
        if obj.stream:
            async def events() -> Any:
                try:
                    async for out in gen:
                        yield sse_data(out)
                except ServerDeadError as exc:
                    yield sse_data(error_body(str(exc), 503))
                yield SSE_DONE
            return sse_response(events())
        out = await first_result(gen)
        return out if isinstance(out, Response) else JSONResponse(out)

    async def with_json_body(request: Request, handler: Any) -> Response:
        try:
            body = await read_json_body(request)
        except ValueError as exc:
            return error_response(str(exc))
        return await handler(body, request)

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize_text(request: Request) -> Response:
        return await with_json_body(request, tokenize.tokenize)

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize_ids(request: Request) -> Response:
        return await with_json_body(request, tokenize.detokenize)

    # ------------------------------------------------------------------ OpenAI
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return openai.list_models()

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        for card in openai.list_models()["data"]:
            if card["id"] == model_id:
                return JSONResponse(card)
        return error_response(f"the model {model_id!r} does not exist (this server serves "
                              f"{tm.served_model_name!r})", 404)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await with_json_body(request, openai.create_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await with_json_body(request, openai.create_chat_completion)

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sglang-chelsea")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------- launching
def ready_message(server_args: ServerArgs) -> str:
    """What ``launch_server`` prints when the server is ready: its URL and a curl example."""
    url = f"http://{server_args.host}:{server_args.port}"
    auth = " -H 'Authorization: Bearer <api-key>'" if server_args.api_key else ""
    body = ('{"text": "The capital of France is", '
            '"sampling_params": {"max_new_tokens": 16, "temperature": 0}}')
    return (f"The server is fired up and ready to roll!\n"
            f"  URL: {url}\n"
            f"  Try: curl {url}/generate -H 'Content-Type: application/json'{auth} "
            f"-d '{body}'\n"
            f"  OpenAI API: {url}/v1 (models, completions, chat/completions)")


async def _watchdog(tm: TokenizerManager, procs: ServerProcesses, server: uvicorn.Server,
                    status: dict[str, int]) -> None:
    """Turn unhealthy and stop serving as soon as a subprocess dies."""
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        reason = procs.dead_process()
        if reason is not None:
            logger.error("%s; the server turns unhealthy and exits", reason)
            tm.set_dead(reason)
            status["exit_code"] = 1
            server.should_exit = True
            return


async def _announce_when_ready(tm: TokenizerManager, server: uvicorn.Server,
                               server_args: ServerArgs, ready_event: Any) -> None:
    """Wait for the socket, warm up with one generation, then print the URL (a data-parallel
    worker sets ``ready_event`` instead: the launcher announces the router)."""
    while not server.started:
        await asyncio.sleep(0.05)
    if not await tm.health_generate(timeout=120.0):
        logger.error("warm-up generation failed")
        return
    if ready_event is not None:
        ready_event.set()
        logger.info("worker ready on %s:%d", server_args.host, server_args.port)
        return
    print(ready_message(server_args), flush=True)
    logger.info("The server is fired up and ready to roll!")


async def _serve(server_args: ServerArgs, port_args: PortArgs, procs: ServerProcesses,
                 ready_event: Any) -> int:
    tm = TokenizerManager(server_args, port_args, procs.scheduler_info)
    tm.start()
    app = create_app(tm, server_args)
    config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                            log_level=server_args.log_level.lower(), timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, log_config=None)
    server = uvicorn.Server(config)
    status = {"exit_code": 0}
    tasks = [asyncio.create_task(_watchdog(tm, procs, server, status)),
             asyncio.create_task(_announce_when_ready(tm, server, server_args, ready_event))]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
    return status["exit_code"] or (0 if server.started else 1)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def launch_server(server_args: ServerArgs, ready_event: Any = None) -> int:
    """Run the server until SIGINT/SIGTERM or a subprocess dies; return the exit code.

    ``--dp-size`` > 1 starts that many workers behind SGLang's router instead
    (entrypoints/data_parallel); a worker gets the multiprocessing ``ready_event`` to set
    once it has warmed up.
    """
    configure_logger(server_args.log_level)
    signal.signal(signal.SIGTERM, _raise_exit)
    if server_args.dp_size > 1:
        from sglang_chelsea.entrypoints.data_parallel import launch_data_parallel

        return launch_data_parallel(server_args)
    port_args = PortArgs.init_new()
    procs: ServerProcesses | None = None
    try:
        procs = launch_subprocesses(server_args, port_args)
        return asyncio.run(_serve(server_args, port_args, procs, ready_event))
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if procs is not None:
            procs.shutdown()
        port_args.cleanup()
        sys.stderr.flush()
