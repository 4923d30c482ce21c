"""Which features of popular OpenAI client libraries work against `trtc serve`: litellm, langchain-openai
and the OpenAI Agents SDK (openai-agents), each driven through its public API.

    litellm             completion: plain, streaming, tools with tool_choice "required", response_format
                        json_schema (a dict, and a pydantic model)
    langchain-openai    ChatOpenAI: invoke, stream, bind_tools(tool_choice="any"), with_structured_output
                        (default method, method="json_schema", method="function_calling")
    openai-agents       an Agent with a function tool (tool_choice "required") over the Chat Completions model
                        and over the Responses model (POST /v1/responses), run and streamed: the tool call is
                        parsed, the tool runs, and the follow-up request with its result is accepted; also
                        with tool_choice kept "required" on every turn, and with output_type (a json_schema
                        response format) alongside tool_choice "required" and "auto"

Any model works; the tool and schema checks need a chat template that renders tools and a tool-call parser
(tool calls under tool_choice "required" and json_schema outputs are grammar-constrained, so even a tiny
random model gives well-formed ones). Start a server, then run the checks with the client libraries installed:

    trtc serve ENGINE_DIR --served_model_name tiny --tool_call_parser hermes --port 8123
    pip install litellm langchain-openai openai-agents
    python examples/openai_clients.py --base_url http://127.0.0.1:8123/v1 --model tiny

Each check prints one line, "PASS name: detail" or "FAIL name: error" ("SKIP" when its library is not
installed), then a summary table. The exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no fetch of its price list at import
CITIES = ["Paris", "Rome"]  # enums keep a random model's constrained output short
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES}},
                       "required": ["city"], "additionalProperties": False},
    },
}
CITY_SCHEMA = {"type": "object", "required": ["name", "capital"], "additionalProperties": False,
               "properties": {"name": {"type": "string", "enum": CITIES}, "capital": {"type": "boolean"}}}


class City(BaseModel):
    """A city and whether it is its country's capital."""

    name: Literal["Paris", "Rome"]
    capital: bool


@dataclass
class Options:
    base_url: str
    model: str
    max_tokens: int
    timeout: float


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str


class CheckFailed(Exception):
    """A check's own verdict (its message is the whole detail)."""


class Checks:
    def __init__(self, verbose: bool) -> None:
        self.results: list[Result] = []
        self.verbose = verbose

    def section(self, package: str, module: str, checks: list[tuple[str, Callable[[], str]]]) -> None:
        """Run `checks` (name, function returning a detail) if `module` imports; otherwise SKIP them."""
        if importlib.util.find_spec(module) is None:
            for name, _ in checks:
                self.record(Result(name, "SKIP", f"{package} is not installed"))
            return
        for name, check in checks:
            try:
                self.record(Result(name, "PASS", check()))
            except Exception as e:  # noqa: BLE001 - a failed check is reported, the others go on
                if self.verbose:
                    traceback.print_exc()
                detail = str(e) if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
                self.record(Result(name, "FAIL", " ".join(detail.split())))

    def record(self, result: Result) -> None:
        self.results.append(result)
        print(f"{result.status} {result.name}: {result.detail}", flush=True)

    def summary(self) -> bool:
        width = max(len(r.name) for r in self.results)
        print(f"\n{'check':<{width}}  result")
        print(f"{'-' * width}  ------")
        for r in self.results:
            print(f"{r.name:<{width}}  {r.status}")
        counts = {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        print(", ".join(f"{n} {s}" for s, n in counts.items()))
        return counts["FAIL"] == 0


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def short(text: str | None, n: int = 40) -> str:
    return repr(text if text is None or len(text) <= n else text[:n] + "...")


def checked_call(name: str, arguments: str | dict) -> str:
    """A tool call's name and its arguments, which must be a JSON object naming a known city."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    expect(name == "get_weather", f"tool call names {name!r}, not 'get_weather'")
    expect(isinstance(args, dict) and args.get("city") in CITIES, f"arguments {args!r} lack a city of {CITIES}")
    return f"{name}({json.dumps(args)})"


# litellm -------------------------------------------------------------------------------------------------
def litellm_checks(o: Options) -> list[tuple[str, Callable[[], str]]]:
    def completion(**kwargs):
        import litellm

        return litellm.completion(model=f"openai/{o.model}", api_base=o.base_url, api_key="x", messages=MESSAGES,
                                  max_tokens=o.max_tokens, timeout=o.timeout, num_retries=0, **kwargs)

    def plain() -> str:
        r = completion()
        expect(isinstance(r.choices[0].message.content, str), f"content is {r.choices[0].message.content!r}")
        return f"content {short(r.choices[0].message.content)}, finish_reason {r.choices[0].finish_reason}"

    def stream() -> str:
        chunks = list(completion(stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expect(len(chunks) > 1 and text, f"{len(chunks)} chunks, text {text!r}")
        return f"{len(chunks)} chunks, text {short(text)}"

    def tools() -> str:
        r = completion(tools=[WEATHER_TOOL], tool_choice="required")
        calls = r.choices[0].message.tool_calls
        expect(bool(calls), f"no tool_calls; content {r.choices[0].message.content!r}")
        return f"{checked_call(calls[0].function.name, calls[0].function.arguments)}, finish_reason " \
               f"{r.choices[0].finish_reason}"

    def json_schema() -> str:
        r = completion(response_format={"type": "json_schema",
                                        "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}})
        value = City.model_validate_json(r.choices[0].message.content)
        return f"content {r.choices[0].message.content!r} -> {value!r}"

    def pydantic_format() -> str:
        r = completion(response_format=City)
        value = City.model_validate_json(r.choices[0].message.content)
        return f"content {r.choices[0].message.content!r} -> {value!r}"

    return [("litellm completion", plain), ("litellm stream", stream), ("litellm tools required", tools),
            ("litellm response_format json_schema", json_schema), ("litellm response_format pydantic", pydantic_format)]


# langchain-openai ----------------------------------------------------------------------------------------
def langchain_checks(o: Options) -> list[tuple[str, Callable[[], str]]]:
    def chat():
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(base_url=o.base_url, api_key="x", model=o.model, max_tokens=o.max_tokens, timeout=o.timeout,
                          max_retries=0)

    def invoke() -> str:
        m = chat().invoke("What is the weather in Paris?")
        expect(isinstance(m.content, str), f"content is {m.content!r}")
        return f"content {short(m.content)}, finish_reason {m.response_metadata.get('finish_reason')}"

    def stream() -> str:
        chunks = list(chat().stream("What is the weather in Paris?"))
        text = "".join(c.content for c in chunks if isinstance(c.content, str))
        expect(len(chunks) > 1 and text, f"{len(chunks)} chunks, text {text!r}")
        return f"{len(chunks)} chunks, text {short(text)}"

    def bind_tools() -> str:
        from langchain_core.tools import tool

        @tool
        def get_weather(city: Literal["Paris", "Rome"]) -> str:
            """The current weather in a city."""
            return f"sunny in {city}"

        m = chat().bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Paris?")
        expect(bool(m.tool_calls), f"no tool_calls; content {m.content!r}, invalid {m.invalid_tool_calls!r}")
        return checked_call(m.tool_calls[0]["name"], m.tool_calls[0]["args"])

    def structured(**kwargs) -> Callable[[], str]:
        def check() -> str:
            value = chat().with_structured_output(City, **kwargs).invoke("Name a city.")
            expect(isinstance(value, City), f"got {value!r}, not a City")
            return repr(value)
        return check

    return [("langchain invoke", invoke), ("langchain stream", stream), ("langchain bind_tools any", bind_tools),
            ("langchain structured default", structured()),
            ("langchain structured json_schema", structured(method="json_schema")),
            ("langchain structured function_calling", structured(method="function_calling"))]


# openai-agents -------------------------------------------------------------------------------------------
def agents_checks(o: Options) -> list[tuple[str, Callable[[], str]]]:
    """Agents with the weather tool over the Chat Completions model and the Responses model, run with
    max_turns=2. tool_choice "required" makes the first turn a tool call; the Agents SDK then resets
    tool_choice, so the follow-up turn (with the tool's result) is free text, unless keep=True: then it
    stays "required" and the run ends at max_turns after two tool calls, whatever the model writes.
    structured=True gives the agent output_type=City (a json_schema response format on every turn)."""

    def agent(api: str, client, calls: list[str], keep: bool, structured: bool, tool_choice: str):
        from agents import (
            Agent,
            ModelSettings,
            OpenAIChatCompletionsModel,
            OpenAIResponsesModel,
            function_tool,
            set_tracing_disabled,
        )

        set_tracing_disabled(True)  # no trace upload: nothing leaves the machine

        @function_tool
        def get_weather(city: Literal["Paris", "Rome"]) -> str:
            """The current weather in a city."""
            calls.append(city)
            return f"sunny in {city}"

        models = {"chat": OpenAIChatCompletionsModel, "responses": OpenAIResponsesModel}
        return Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
                     model=models[api](model=o.model, openai_client=client), reset_tool_choice=not keep,
                     output_type=City if structured else None,
                     model_settings=ModelSettings(tool_choice=tool_choice, max_tokens=o.max_tokens))

    def run(api: str, streamed: bool = False, keep: bool = False, structured: bool = False,
            tool_choice: str = "required") -> Callable[[], str]:
        async def go(calls: list[str]):
            from agents import Runner
            from openai import AsyncOpenAI

            async with AsyncOpenAI(base_url=o.base_url, api_key="x", timeout=o.timeout, max_retries=0) as client:
                a = agent(api, client, calls, keep, structured, tool_choice)
                question = "What is the weather in Paris?"
                if not streamed:
                    return await Runner.run(a, question, max_turns=2)
                result = Runner.run_streamed(a, question, max_turns=2)
                async for _ in result.stream_events():
                    pass
                return result

        def check() -> str:
            from agents.exceptions import AgentsException, MaxTurnsExceeded

            calls: list[str] = []
            try:
                result = asyncio.run(go(calls))
            except MaxTurnsExceeded:  # two model turns ran, both answered
                expect(bool(calls), "max_turns exceeded and the tool never ran")
                return f"tool ran {len(calls)}x with {calls}; then MaxTurnsExceeded (max_turns=2, no final answer)"
            except AgentsException as e:  # what the run got through before it failed
                responses = len(e.run_data.raw_responses) if e.run_data is not None else "?"
                raise CheckFailed(f"{type(e).__name__}: {e} [before it: tool ran with {calls}, {responses} model "
                                  "responses]") from e
            final = result.final_output
            expect(bool(calls) or tool_choice != "required", f"the tool never ran; final output {final!r}")
            expect(isinstance(final, City) or not structured, f"final output {final!r} is not a City")
            items = [i.type for i in result.new_items]
            return f"tool ran with {calls}; {len(result.raw_responses)} model responses, items {items}, " \
                   f"final output {short(repr(final))}"
        return check

    return [("agents chat run", run("chat")),
            ("agents chat streamed", run("chat", streamed=True)),
            ("agents responses run", run("responses")),
            ("agents responses streamed", run("responses", streamed=True)),
            ("agents responses run, tool_choice kept", run("responses", keep=True)),
            ("agents responses streamed, tool_choice kept", run("responses", streamed=True, keep=True)),
            ("agents chat output_type + required", run("chat", structured=True)),
            ("agents responses output_type + required", run("responses", structured=True)),
            ("agents chat output_type + auto", run("chat", structured=True, tool_choice="auto")),
            ("agents responses output_type + auto", run("responses", structured=True, tool_choice="auto"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    p.add_argument("--model", default="tiny", help="the served model name (--served_model_name)")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60, help="seconds per request")
    p.add_argument("--only", choices=["litellm", "langchain", "agents"], action="append",
                   help="run only these sections (repeatable)")
    p.add_argument("--verbose", action="store_true", help="print each failure's traceback")
    args = p.parse_args()
    o = Options(args.base_url.rstrip("/"), args.model, args.max_tokens, args.timeout)
    if not args.verbose:  # the Agents SDK logs each failed model call; the check's line says it
        logging.getLogger("openai.agents").setLevel(logging.CRITICAL)
    checks = Checks(args.verbose)
    sections = {"litellm": ("litellm", "litellm", litellm_checks),
                "langchain": ("langchain-openai", "langchain_openai", langchain_checks),
                "agents": ("openai-agents", "agents", agents_checks)}
    for key, (package, module, make) in sections.items():
        if not args.only or key in args.only:
            checks.section(package, module, make(o))
    return 0 if checks.summary() else 1


if __name__ == "__main__":
    sys.exit(main())
