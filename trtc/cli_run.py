"""`trtc run`: prompts in, text out (TensorRT-LLM run.py's output format), JSON for machines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trtc.errors import TrtcError
from trtc.utils.paths import check_input_file, check_output_file


def read_prompts(input_text: list[str], input_file: str | None) -> list[str]:
    prompts = list(input_text)
    if input_file is not None:
        path = check_input_file(input_file, "--input_file", "pass a .txt file (one prompt a line) or a .json list")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TrtcError(f"--input_file {path} is not UTF-8 text ({e}); save it as UTF-8") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise TrtcError(f"--input_file {path} is not valid JSON ({e})") from None
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise TrtcError(f"--input_file {path} must hold a JSON list of strings")
            prompts += data
        else:
            prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise TrtcError("no prompt given; pass --input_text \"...\" or --input_file FILE")
    return prompts


# SamplingParams field -> the run flag that sets it, where the names differ
FLAG_OF_FIELD = {"max_tokens": "--max_output_len", "seed": "--random_seed", "stop": "--stop_words"}


def sampling_params(max_output_len, random_seed, stop_words, sampling: dict):
    """The run flags as SamplingParams; a bad value is an error naming the flag the user typed."""
    from trtc.runtime.sampling_params import SamplingParams

    try:
        return SamplingParams(max_tokens=max_output_len, seed=random_seed, stop=stop_words, **sampling)
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        raise TrtcError(f"{FLAG_OF_FIELD.get(name, '--' + name)} {rest}") from None


def run_engine(engine_dir, prompts, input_file, max_output_len, random_seed, stop_words, streaming, output_json,
               free_gpu_memory_fraction, sampling: dict, kv_cache_max_tokens: int | None = None,
               speculative_config=None, lora_dir: str | None = None) -> bool:
    """Run every prompt in flight together; returns False if any prompt was rejected."""
    from trtc.formats.engine import Engine
    from trtc.llm import LLM
    from trtc.runtime.lora import LoRARequest

    prompts = read_prompts(prompts, input_file)
    params = sampling_params(max_output_len, random_seed, stop_words, sampling)
    check_output_file(output_json, "--output_json")
    vocab = Engine.load(engine_dir).graph.vocab_size  # an engine, not a checkpoint or an HF directory
    if params.end_id is not None and params.end_id >= vocab:
        raise TrtcError(f"--end_id {params.end_id} is not a token of the model (vocabulary of {vocab}); "
                        f"pass an id below {vocab}, or -1 for none")
    lora = None if lora_dir is None else LoRARequest("lora", 1, lora_dir)
    with LLM(engine_dir, kv_cache_max_tokens=kv_cache_max_tokens,
             kv_cache_free_gpu_memory_fraction=free_gpu_memory_fraction, speculative_config=speculative_config,
             enable_lora=lora is not None, max_loras=1, max_lora_rank=adapter_rank(lora_dir) if lora else 16) as llm:
        if streaming:
            outputs = _stream(llm, prompts, params, lora)
        else:
            outputs = llm.generate(prompts, params, lora_request=lora)
    ok = True
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if out.error is not None:
            click.echo(f"Error: input {i} rejected: {out.error}", err=True)
            ok = False
        elif not streaming:
            click.echo(f'Input [Text {i}]: "{prompt}"')
            click.echo(f'Output [Text {i} Beam 0]: "{out.text}"')
    if output_json is not None:
        records = [
            {"input_text": p, "input_ids": o.prompt_token_ids, "output_text": o.text, "output_ids": o.token_ids,
             "finish_reason": o.finish_reason, **({"error": o.error} if o.error else {})}
            for p, o in zip(prompts, outputs)
        ]
        Path(output_json).write_text(json.dumps(records, indent=2) + "\n")
    return ok


def adapter_rank(lora_dir: str) -> int:
    """The rank of a PEFT adapter (its adapter_config.json's r), to size the one slot `trtc run` needs."""
    path = Path(lora_dir) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError) as e:
        raise TrtcError(f"--lora_dir {lora_dir}: no readable adapter_config.json with its rank r ({e}); pass a PEFT "
                        "LoRA adapter directory") from None


def _stream(llm, prompts: list[str], params, lora=None) -> list:
    """Run every prompt in flight together and stream their text to stdout in prompt order: the
    first unfinished prompt's text is shown as it grows; the later ones (generated meanwhile) follow."""
    outputs: list = [None] * len(prompts)
    current, shown = 0, None  # shown: characters of prompt `current` on screen (None: header not yet)
    for i, out in llm.generate_stream_batch(prompts, params, lora):
        outputs[i] = out
        while current < len(prompts) and outputs[current] is not None:
            out = outputs[current]
            if out.error is None:
                if shown is None:
                    click.echo(f'Input [Text {current}]: "{prompts[current]}"')
                    click.echo(f"Output [Text {current} Beam 0]: ", nl=False)
                    shown = 0
                sys.stdout.write(out.text[shown:])
                sys.stdout.flush()
                shown = len(out.text)
            if not out.finished:
                break
            if out.error is None:
                click.echo("")
            current, shown = current + 1, None
    return outputs
