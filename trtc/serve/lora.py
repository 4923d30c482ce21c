"""LoRA adapters in `trtc serve`: `--lora_modules name=path` (vLLM's), served under their names (the
`model` field picks one; `/v1/models` lists them with the base as `parent`), and vLLM's runtime routes
`POST /v1/load_lora_adapter` {"lora_name", "lora_path"} and `POST /v1/unload_lora_adapter` {"lora_name"}
(behind --api_key like every /v1 route). An adapter is checked against the engine's model before it is
served (rank, modules, shapes): a bad one is one line at start-up, a 400 at load."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from trtc.errors import TrtcError
from trtc.formats.engine import Engine
from trtc.runtime.lora import LoRARequest, load_adapter
from trtc.serve.errors import APIError, parse_body


class LoRATable:
    """name -> LoRARequest of the adapters a server serves; ids in the order they were added."""

    def __init__(self, engine: Engine, max_lora_rank: int, enabled: bool) -> None:
        self.engine, self.max_lora_rank, self.enabled = engine, max_lora_rank, enabled
        self.by_name: dict[str, LoRARequest] = {}
        self._next_id = 1

    def add(self, name: str, path: str) -> LoRARequest:
        """Check the adapter and serve it as `name`; TrtcError naming the problem."""
        if not self.enabled:
            raise TrtcError("this server has no LoRA slots; start it with --enable_lora (or --lora_modules)")
        if name in self.by_name:
            raise TrtcError(f"a LoRA adapter named {name!r} is already served; unload it first or pick another name")
        load_adapter(path, self.engine.graph, self.engine.mapping, self.max_lora_rank)  # refuses a bad adapter
        self.by_name[name] = LoRARequest(name, self._next_id, str(path))
        self._next_id += 1
        return self.by_name[name]

    @classmethod
    def from_modules(cls, engine: Engine, modules: list[str], max_lora_rank: int, enabled: bool) -> LoRATable:
        """From --lora_modules name=path ...: TrtcError for a malformed entry or a bad adapter."""
        table = cls(engine, max_lora_rank, enabled)
        for entry in modules:
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise TrtcError(f"--lora_modules {entry!r}: expected NAME=PATH (a PEFT adapter directory)")
            table.add(name, path)
        return table


class LoadLoRA(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRA(BaseModel):
    lora_name: str


def add_lora_routes(app: FastAPI, table: LoRATable, single_front: bool) -> None:
    def check_runtime_updates() -> None:
        if not single_front:
            raise APIError(400, "adapters are loaded at run time only with --api_server_count 1 (each API server "
                                "has its own table); pass them with --lora_modules at start-up instead")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        req = await parse_body(request, LoadLoRA)
        check_runtime_updates()
        try:
            table.add(req.lora_name, req.lora_path)
        except TrtcError as e:
            raise APIError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        req = await parse_body(request, UnloadLoRA)
        check_runtime_updates()
        if table.by_name.pop(req.lora_name, None) is None:
            raise APIError(404, f"no LoRA adapter named {req.lora_name!r} is served", "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
