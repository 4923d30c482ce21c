"""The `trtc` command line (click). Flag names follow TensorRT-LLM's workflow."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from trtc.cli_config import config_file_option
from trtc.errors import TrtcError
from trtc.serve.reasoning_parsers import REASONING_PARSERS  # light: the parsers import no model code
from trtc.serve.tool_parsers import TOOL_PARSERS
from trtc.version import __version__

DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16"]


def user_errors(fn):
    """Turn a TrtcError into one line on stderr and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrtcError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # disk full, permission denied, ...: the system's reason and the path
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}; free space or fix permissions, then retry") from None

    return wrapper


class ConcurrencyList(click.ParamType):
    """`--concurrency 64` or a sweep, `--concurrency 1,8,32`: a list of ints >= 1."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            levels = [int(v) for v in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a number or a comma-separated list of numbers (e.g. 1,8,32)", param, ctx)
        if any(v < 1 for v in levels):
            self.fail(f"{value!r}: every value must be at least 1", param, ctx)
        return levels


CONCURRENCY_LIST = ConcurrencyList()

KV_CACHE_OPTIONS = [
    click.option("--kv_cache_max_tokens", "--max_tokens_in_paged_kv_cache", "kv_cache_max_tokens", default=None,
                 type=click.IntRange(min=1),
                 help="Tokens the paged KV cache holds. [default: what fits in --kv_cache_free_gpu_memory_fraction "
                      "of the free GPU memory; on CPU, a quarter of the available RAM, at most 65536 tokens or one "
                      "max_seq_len sequence]"),
    click.option("--kv_cache_free_gpu_memory_fraction", type=float, default=0.9, show_default=True,
                 help="Share of the GPU memory left after the weights that the KV cache takes."),
]


def kv_cache_options(fn):
    for option in reversed(KV_CACHE_OPTIONS):
        fn = option(fn)
    return fn


def quiet_option(fn):
    """--quiet: no progress bars and no informational lines (warnings and errors still show)."""

    def set_quiet(ctx, param, value):
        if value:
            logging.getLogger("trtc").setLevel(logging.WARNING)
        return value

    return click.option("--quiet", is_flag=True, callback=set_quiet, expose_value=True,
                        help="No progress bars or informational lines (warnings and errors still show).")(fn)


def speculative_options(fn):
    """--speculative_decoding_mode / --max_draft_len (TensorRT-LLM's names): draft tokens verified in one step."""
    fn = click.option("--max_draft_len", default=None, type=click.IntRange(1, 16),
                      help="Speculation: draft tokens per request per step at most. [default: 4]")(fn)
    fn = click.option("--draft_engine_dir", default=None, type=click.Path(),
                      help="Speculation, draft_target: the draft engine (same vocabulary as the target).")(fn)
    return click.option("--speculative_decoding_mode", default=None, type=click.Choice(["ngram", "draft_target"]),
                        help="Speculative decoding: ngram proposes the tokens that followed the latest earlier "
                             "occurrence of the last tokens (prompt lookup, no draft model); draft_target runs a "
                             "small draft engine (--draft_engine_dir); the target verifies the draft in one step "
                             "(greedy output unchanged, sampling equally distributed).")(fn)


def speculative_config_of(mode: str | None, max_draft_len: int | None, draft_engine_dir: str | None = None):
    from trtc.runtime.speculative import speculative_config

    return speculative_config(mode, max_draft_len, draft_engine_dir)


def progress_of(quiet: bool) -> bool | None:
    """The `progress` argument of long steps: off with --quiet, else on a terminal only."""
    return False if quiet else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trtc")
def main() -> None:
    """trtc: compile a Hugging Face LLM ahead of time and run it fast."""
    configure_logging()


class _StderrHandler(logging.StreamHandler):
    """trtc's handler of log lines: to stderr."""


LIBRARIES = ("transformers", "torch", "modelopt", "huggingface_hub", "tokenizers", "accelerate", "onnx", "triton")


def configure_logging() -> None:
    """trtc's own lines on stderr ("[trtc] ..."; warnings too); the libraries' chatter (transformers,
    ModelOpt, torch warnings) only at TRTC_LOG_LEVEL=debug."""
    debug = os.environ.get("TRTC_LOG_LEVEL", "").lower() == "debug"
    trtc_log = logging.getLogger("trtc")
    trtc_log.setLevel(logging.DEBUG if debug else logging.INFO)
    trtc_log.propagate = False
    if not any(isinstance(h, _StderrHandler) for h in trtc_log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[trtc] %(message)s"))
        trtc_log.addHandler(handler)
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root.addHandler(handler)
    for h in root.handlers:
        if isinstance(h, _StderrHandler):
            h.setLevel(logging.DEBUG if debug else logging.ERROR)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:
            import transformers

            transformers.utils.logging.set_verbosity_error()
        for name in LIBRARIES:
            warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")


@main.command()
@click.option("--model_dir", required=True, type=click.Path(), help="An HF model directory or Hugging Face model id.")
@click.option("--revision", default=None, help="With a Hub model id: its branch, tag or commit.")
@click.option("--output_dir", required=True, type=click.Path(), help="Where to write the trtc checkpoint.")
@click.option("--tp", "--tp_size", "tp_size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel size: one rank{N}.safetensors per rank.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES),
              help="Weight dtype; auto keeps the model's.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@quiet_option
@user_errors
def convert(model_dir: str, revision: str | None, output_dir: str, tp_size: int, dtype: str, overwrite: bool,
            quiet: bool) -> None:
    """Convert an HF checkpoint into a layer-graph checkpoint (per tensor-parallel rank)."""
    from trtc.converters.convert import convert as run_convert
    from trtc.converters.hub import resolve_model_dir

    model_dir = resolve_model_dir(model_dir, revision)
    out = run_convert(model_dir, output_dir, tp_size=tp_size, dtype=dtype, overwrite=overwrite,
                      progress=progress_of(quiet))
    click.echo(f"wrote {out} (tp {tp_size})")


BUILD_OPTIONS = [
    click.option("--max_batch_size", default=256, show_default=True, type=int, help="Most requests in one step."),
    click.option("--max_seq_len", default=None, type=int,
                 help="Longest prompt + output. [default: the model's max_position_embeddings]"),
    click.option("--max_num_tokens", default=8192, show_default=True, type=int,
                 help="Token budget of one step (longer prompts are prefilled in chunks)."),
    click.option("--tokens_per_block", default=32, show_default=True, type=int, help="Tokens per KV-cache block."),
    click.option("--kv_cache_dtype", default="auto", show_default=True,
                 type=click.Choice(["auto", "float32", "float16", "bfloat16", "fp8"]),
                 help="auto (fp8 for a checkpoint with FP8 KV scales, else the weights' dtype), float32, float16, bfloat16, fp8."),
    click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "tensorrt"]),
                 help="cuda: trtc's kernels; tensorrt: ONNX graphs built into TensorRT plans; auto: tensorrt where "
                      "TensorRT is installed and there is a GPU, else cuda."),
]


def build_options(fn):
    for option in reversed(BUILD_OPTIONS):
        fn = option(fn)
    return fn


CALIB_OPTIONS = [
    click.option("--calib_dataset", multiple=True, type=click.Path(),
                 help="Calibration text: a plain-text or .jsonl file (repeat the flag for more). "
                      "[default: a public-domain book shipped with trtc]"),
    click.option("--calib_size", default=512, show_default=True, type=int, help="Calibration windows."),
    click.option("--calib_max_seq_len", "--calib_max_seq_length", "calib_max_seq_length", default=512,
                 show_default=True, type=int, help="Tokens per calibration window (BOS first)."),
    click.option("--group_size", "--awq_block_size", "awq_block_size", default=128, show_default=True, type=int,
                 help="INT4 group size (input columns per scale): 32, 64 or 128."),
    click.option("--awq_algorithm", default="clip", show_default=True, type=click.Choice(["lite", "clip", "full"]),
                 help="int4_awq: ModelOpt's AWQ search: lite (activation-aware scales), clip (group ranges), full (both)."),
]


def calib_options(fn):
    for option in reversed(CALIB_OPTIONS):
        fn = option(fn)
    return fn


@main.command()
@click.option("--model_dir", required=True, type=click.Path(),
              help="An HF model directory or Hugging Face model id (bf16/fp16/fp32).")
@click.option("--revision", default=None, help="With a Hub model id: its branch, tag or commit.")
@click.option("--output_dir", required=True, type=click.Path(), help="Where to write the quantized trtc checkpoint.")
@click.option("--qformat", required=True, type=click.Choice(["fp8", "int4_awq", "int4_gptq"]),
              help="fp8: FP8 weights and activations; int4_awq / int4_gptq: INT4 weights in groups (W4A16).")
@click.option("--kv_cache_dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp8"]),
              help="fp8: also calibrate an FP8 KV cache; auto: the KV cache keeps the model's dtype.")
@calib_options
@click.option("--batch_size", default=8, show_default=True, type=int, help="Calibration windows per forward.")
@click.option("--tp", "--tp_size", "tp_size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel size: one rank{N}.safetensors per rank.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES),
              help="Dtype of the unquantized tensors; auto keeps the model's.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where ModelOpt calibrates (cpu: float32; cuda: the model's dtype; auto: cuda if there is a GPU).")
@click.option("--eval_dataset", multiple=True, type=click.Path(),
              help="Text of the report's perplexity. [default: the calibration text after what calibration used]")
@click.option("--skip_report", is_flag=True, help="Skip the report (perplexity and greedy agreement vs unquantized).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@quiet_option
@user_errors
def quantize(model_dir, revision, output_dir, qformat, kv_cache_dtype, calib_dataset, calib_size, calib_max_seq_length,
             awq_block_size, awq_algorithm, batch_size, tp_size, dtype, device, eval_dataset, skip_report,
             overwrite, quiet) -> None:
    """Quantize an HF model with NVIDIA ModelOpt into a trtc checkpoint (FP8, INT4 AWQ, INT4 GPTQ)."""
    from trtc.converters.hub import resolve_model_dir
    from trtc.quantization.calibration import DEFAULT_CALIBRATION_TEXT
    from trtc.quantization.quantize import quantize as run_quantize

    model_dir = resolve_model_dir(model_dir, revision)
    kv = "fp8" if kv_cache_dtype == "fp8" else None
    out = run_quantize(model_dir, output_dir, qformat, list(calib_dataset), kv, calib_size, calib_max_seq_length,
                       batch_size, awq_block_size, awq_algorithm, tp_size, dtype, device, overwrite,
                       progress=progress_of(quiet))
    if not skip_report:
        from trtc.quantization.quantize import load_tokenizer
        from trtc.tools.quant_report import quant_report

        quant_report(Path(model_dir), out, load_tokenizer(Path(model_dir)), list(eval_dataset),
                     list(calib_dataset) or [DEFAULT_CALIBRATION_TEXT])
    click.echo(f"wrote {out} ({qformat}{' + fp8 KV cache' if kv else ''}, tp {tp_size})")


@main.command()
@config_file_option
@click.option("--checkpoint_dir", type=click.Path(), help="A checkpoint written by `trtc convert` or `trtc quantize`.")
@click.option("--model_dir", type=click.Path(),
              help="An HF model directory or Hugging Face model id: convert (or quantize) and build in one go.")
@click.option("--revision", default=None, help="With a Hub model id: its branch, tag or commit.")
@click.option("--from_onnx", type=click.Path(),
              help="A directory written by `--backend tensorrt`: build its ONNX graphs into TensorRT plans.")
@click.option("--output_dir", type=click.Path(), help="Where to write the engine.")
@click.option("--tp", "--tp_size", "tp_size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel size (with --model_dir).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES), help="With --model_dir.")
@click.option("--fp8", "qformats", flag_value="fp8", multiple=True, help="With --model_dir: quantize to FP8 first.")
@click.option("--int4_awq", "qformats", flag_value="int4_awq", multiple=True, help="With --model_dir: INT4 AWQ first.")
@click.option("--int4_gptq", "qformats", flag_value="int4_gptq", multiple=True, help="With --model_dir: INT4 GPTQ first.")
@calib_options
@build_options
@click.option("--target", default="auto", show_default=True,
              help="The GPU the engine is for: auto (this machine), cpu, an architecture (sm80, sm90, sm100) or a GPU "
                   "name (h100, h200, ...). Built without that GPU, its tactics are tuned at the first load there.")
@click.option("--gpu_memory", type=float, default=None,
              help="GiB of the target GPU for the memory plan's check. [default: the GPU present or named by --target]")
@click.option("--dry_run", is_flag=True, help="Print the memory plan and check it; build nothing.")
@click.option("--output_json", type=click.Path(), help="With --dry_run: write the plan as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@quiet_option
@user_errors
def build(checkpoint_dir, model_dir, revision, from_onnx, output_dir, tp_size, dtype, qformats, calib_dataset,
          calib_size, calib_max_seq_length, awq_block_size, awq_algorithm, overwrite, backend, target, gpu_memory,
          dry_run, output_json, config_file, quiet, **limits) -> None:
    """Build an engine directory from a checkpoint (or straight from an HF directory or model id)."""
    from trtc.cli_build import run_build

    if from_onnx is not None:
        if output_dir is None:
            raise TrtcError("--output_dir is missing; pass where to write the engine")
        _build_from_onnx(from_onnx, output_dir, overwrite, limits)
        return
    run_build(checkpoint_dir, model_dir, output_dir, tp_size, dtype, qformats, calib_dataset, calib_size,
              calib_max_seq_length, awq_block_size, awq_algorithm, overwrite, backend, target, gpu_memory, dry_run,
              output_json, limits, progress_of(quiet))


def _build_from_onnx(source: str, output_dir: str, overwrite: bool, limits: dict) -> None:
    """`trtc build --from_onnx DIR`: only the output and the optimization-profile limits may be given."""
    from trtc.compiler.build_tensorrt import PROFILE_LIMITS, build_from_onnx

    ctx = click.get_current_context()
    given = [name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    allowed = ["from_onnx", "output_dir", "overwrite", "quiet", *PROFILE_LIMITS]
    if ctx.params["backend"] == "tensorrt":
        allowed.append("backend")
    extra = [name for name in given if name not in allowed]
    if extra:
        raise TrtcError(f"--{extra[0]} is decided when the ONNX graphs are written; --from_onnx takes only "
                        f"--output_dir, --overwrite and {', '.join('--' + n for n in PROFILE_LIMITS)}")
    out = build_from_onnx(source, output_dir, {n: limits[n] for n in PROFILE_LIMITS if n in given}, overwrite)
    click.echo(f"wrote engine {out}")


@main.command(name="eval")
@click.option("--engine_dir", required=True, type=click.Path(), help="An engine directory from `trtc build`.")
@click.option("--dataset", "datasets", multiple=True, type=click.Path(), help="A plain-text file (repeat for more).")
@click.option("--max_tokens", default=60000, show_default=True, type=int, help="Tokens of each text scored, from its start.")
@click.option("--max_seq_len", "--window_len", "window_len", default=None, type=int,
              help="Tokens per window: BOS, then max_seq_len - 1 text tokens (non-overlapping windows). "
                   "[default: 512, or the engine's max_seq_len - 1 if smaller]")
@click.option("--output_json", type=click.Path(),
              help='Write {"perplexity", "num_tokens", ...} (a list of them for several datasets).')
@kv_cache_options
@quiet_option
@user_errors
def eval_(engine_dir, datasets, max_tokens, window_len, output_json, kv_cache_max_tokens,
          kv_cache_free_gpu_memory_fraction, quiet) -> None:
    """Perplexity of an engine on text (teacher-forced windows, through the runtime)."""
    from trtc.cli_eval import eval_engine

    eval_engine(engine_dir, list(datasets), max_tokens, window_len, output_json, kv_cache_free_gpu_memory_fraction,
                kv_cache_max_tokens, progress_of(quiet))


@main.command()
@click.option("--engine_dir", required=True, type=click.Path(), help="An engine directory from `trtc build`.")
@click.option("--input_text", multiple=True, help='Prompts: --input_text "a" "b" ...')
@click.argument("more_input_text", nargs=-1)
@click.option("--input_file", type=click.Path(), help="Prompts from a .txt file (one per line) or a .json list.")
@click.option("--max_output_len", default=64, show_default=True, type=int, help="New tokens at most.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (greedy when unset).")
@click.option("--top_k", type=int, default=None, help="Sample from the k most likely tokens (0: off; 1: greedy).")
@click.option("--top_p", type=float, default=None,
              help="Sample from the most likely tokens whose probabilities sum to p, in (0, 1] (1: off).")
@click.option("--min_p", type=float, default=None,
              help="Drop tokens less likely than min_p times the most likely one, in [0, 1] (0: off).")
@click.option("--repetition_penalty", type=float, default=1.0, show_default=True,
              help="HF's penalty on tokens of the prompt and output, > 0 (1: off).")
@click.option("--presence_penalty", type=float, default=0.0, show_default=True,
              help="OpenAI's penalty on tokens already in the output, in [-2, 2] (0: off).")
@click.option("--frequency_penalty", type=float, default=0.0, show_default=True,
              help="OpenAI's penalty per occurrence in the output, in [-2, 2] (0: off).")
@click.option("--random_seed", type=int, default=None, help="Seed of every request's sampling.")
@click.option("--stop_words", multiple=True, help="A string that ends generation (repeat the flag for more).")
@click.option("--end_id", type=int, default=None, help="End token id [default: the model's EOS; -1: none].")
@click.option("--streaming", is_flag=True, help="Print tokens as they are generated.")
@click.option("--output_json", type=click.Path(), help="Write the results as JSON for machines.")
@kv_cache_options
@speculative_options
@click.option("--lora_dir", default=None, type=click.Path(), help="A PEFT LoRA adapter directory applied to every prompt.")
@quiet_option
@user_errors
def run(engine_dir, input_text, more_input_text, input_file, max_output_len, random_seed, stop_words, streaming,
        output_json, kv_cache_max_tokens, kv_cache_free_gpu_memory_fraction, speculative_decoding_mode,
        draft_engine_dir, max_draft_len, lora_dir, quiet, **sampling) -> None:
    """Generate text with an engine (greedy unless sampling flags are given)."""
    from trtc.cli_run import run_engine

    if more_input_text and not input_text:
        raise TrtcError(f"unexpected argument {more_input_text[0]!r}; prompts go after --input_text")
    ok = run_engine(engine_dir, [*input_text, *more_input_text], input_file, max_output_len, random_seed,
                    list(stop_words), streaming, output_json, kv_cache_free_gpu_memory_fraction, sampling,
                    kv_cache_max_tokens, speculative_config_of(speculative_decoding_mode, max_draft_len,
                                                               draft_engine_dir), lora_dir)
    if not ok:
        sys.exit(1)


@main.command()
@click.option("--engine_dir", type=click.Path(), help="An engine directory from `trtc build` (offline benchmark).")
@click.option("--url", default=None, help="Benchmark a running server instead (trtc serve or another OpenAI server).")
@click.option("--request_rate", default=None, type=click.FloatRange(min=0, min_open=True),
              help="With --url: Poisson arrivals at this many requests/s. [default: all at once, up to --concurrency]")
@click.option("--range_ratio", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="With --url: prompt lengths uniform in [isl*(1-r), isl*(1+r)].")
@click.option("--api_key", default=None, help="With --url: the server's API key [env: TRTC_API_KEY].")
@click.option("--client_processes", default=None, type=click.IntRange(min=1),
              help="With --url: client processes that share the requests. [default: one per 64 in flight, at most "
                   "one per CPU core]")
@click.option("--isl", default=128, show_default=True, type=click.IntRange(min=1), help="Input tokens per request.")
@click.option("--osl", default=128, show_default=True, type=click.IntRange(min=1), help="Output tokens per request.")
@click.option("--num_requests", default=None, type=click.IntRange(min=1),
              help="Requests to run. [default: 1000; in latency mode, one batch of --batch_size]")
@click.option("--concurrency", default=None, type=CONCURRENCY_LIST,
              help="Requests in flight at most; a list (1,8,32) sweeps, one run per value, and --output_json "
                   "writes a list. [default: the engine's max_batch_size, at most --num_requests]")
@click.option("--latency", is_flag=True,
              help="Latency mode: batches of --batch_size requests, one after another; reports MBU.")
@click.option("--batch_size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Latency mode: requests run together in each batch.")
@click.option("--max_throughput", is_flag=True,
              help="Max-throughput mode (trtllm-bench's): every request queued at once, the engine's whole "
                   "max_batch_size in flight, KV fraction 0.95 unless given; reports TensorRT-LLM's published "
                   "figure for this card beside trtc's.")
@click.option("--max_seconds", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Max-throughput mode: a time budget; requests still running then are cancelled and the "
                   "tokens generated until then counted.")
@kv_cache_options
@speculative_options
@click.option("--output_json", type=click.Path(), help="Write the figures as JSON.")
@quiet_option
@user_errors
def bench(engine_dir, url, request_rate, range_ratio, api_key, client_processes, isl, osl, num_requests, concurrency,
          latency, batch_size, max_throughput, max_seconds, kv_cache_max_tokens, kv_cache_free_gpu_memory_fraction,
          speculative_decoding_mode, draft_engine_dir, max_draft_len, output_json, quiet) -> None:
    """Measure throughput (default), max throughput (--max_throughput, trtllm-bench's method) or batch
    latency of an engine on synthetic prompts, or with --url the serving metrics of a running server
    (TTFT / TPOT / ITL / E2E)."""
    if (engine_dir is None) == (url is None):
        raise TrtcError("pass one of --engine_dir (an engine, offline) or --url (a running server)")
    levels = concurrency or [None]
    speculative = speculative_config_of(speculative_decoding_mode, max_draft_len, draft_engine_dir)
    if url is not None:
        if speculative is not None:
            raise TrtcError("--speculative_decoding_mode is the engine's; with --url, start the server with it")
        _bench_url(url, request_rate, range_ratio, api_key, isl, osl, num_requests or 1000, levels, client_processes,
                   output_json)
        return

    from trtc.runtime.executor import Executor
    from trtc.tools.bench import MAX_THROUGHPUT_KV_FRACTION, check_latency_batches, format_result
    from trtc.tools.bench import bench as run_bench
    from trtc.tools.bench import max_throughput as run_max_throughput
    from trtc.utils.paths import check_output_file

    ctx = click.get_current_context()
    if max_throughput and (latency or concurrency is not None):
        raise TrtcError("--max_throughput queues every request at once; drop --latency and --concurrency")
    if max_seconds is not None and not max_throughput:
        raise TrtcError("--max_seconds is max-throughput mode's time budget; add --max_throughput")
    fraction_given = ctx.get_parameter_source("kv_cache_free_gpu_memory_fraction") == click.core.ParameterSource.COMMANDLINE
    if max_throughput and not fraction_given:
        kv_cache_free_gpu_memory_fraction = MAX_THROUGHPUT_KV_FRACTION
    if not latency and ctx.get_parameter_source("batch_size") == click.core.ParameterSource.COMMANDLINE:
        raise TrtcError("--batch_size sets latency mode's batches; add --latency, or use --concurrency for throughput")
    if latency and concurrency is not None:
        raise TrtcError("--concurrency is for throughput mode; latency mode runs --batch_size requests together")
    if latency:
        check_latency_batches(num_requests, batch_size)
    check_output_file(output_json, "--output_json")
    ex = Executor(engine_dir, kv_cache_max_tokens=kv_cache_max_tokens,
                  free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction, speculative_config=speculative)
    try:
        bc = ex.engine.build_config
        if isl + osl > bc.max_seq_len:
            raise TrtcError(f"--isl {isl} + --osl {osl} exceeds the engine's max_seq_len {bc.max_seq_len}; "
                            "use shorter requests or rebuild with a larger --max_seq_len")
        results = []
        for level in levels:
            if max_throughput:
                results.append(run_max_throughput(ex, isl, osl, num_requests, max_seconds, progress=progress_of(quiet)))
            else:
                results.append(run_bench(ex, isl, osl, num_requests, level, latency, batch_size,
                                         progress=progress_of(quiet)))
            results[-1].load_seconds = ex.load_seconds
            click.echo(format_result(results[-1]))
    finally:
        ex.close()
    _write_bench_json(output_json, results, len(levels) > 1)


@main.command(name="inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@user_errors
def inspect_(path: str, as_json: bool) -> None:
    """What an engine or checkpoint holds: model, quantization, tp, build limits, target, tactics, files."""
    from trtc.tools.inspect import inspect_command

    click.echo(inspect_command(path, as_json))


@main.command()
@click.argument("engine_dir", type=click.Path())
@click.option("--force", is_flag=True, help="Tune again an engine that already holds tactics.")
@user_errors
def tune(engine_dir: str, force: bool) -> None:
    """Tune an engine's kernel tactics on this GPU and store them in the engine (for engines built with --target)."""
    from trtc.compiler.tune import tune_engine
    from trtc.formats.engine import Engine

    engine = tune_engine(Engine.load(engine_dir), force=force, log_line=click.echo)
    click.echo(f"tuned {engine.directory} on {engine.target.get('gpu_name')}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--host", default=None, help="Address to bind. [default: 127.0.0.1, loopback only]")
@click.option("--port", default=None, type=click.IntRange(0, 65535), help="[default: 8000]")
@click.option("--tp", "--tp_size", "tp_size", default=None, type=click.IntRange(min=1),
              help="Tensor-parallel size when MODEL is an HF directory. [default: 1]")
@click.option("--api_key", default=None, help="Require Authorization: Bearer KEY on /v1 routes [env: TRTC_API_KEY].")
@click.option("--served_model_name", default=None, help="The model name clients send. [default: MODEL's folder name]")
@click.option("--chat_template", default=None, type=click.Path(), help="A Jinja chat template file for /v1/chat/completions.")
@click.option("--max_queued_requests", default=None, type=click.IntRange(min=0),
              help="Waiting requests at most; past it the server answers 503. [default: no bound]")
@click.option("--kv_cache_free_gpu_memory_fraction", type=float, default=None, help="[default: 0.9]")
@click.option("--kv_cache_max_tokens", "--max_tokens_in_paged_kv_cache", "kv_cache_max_tokens", default=None,
              type=click.IntRange(min=1), help="Tokens the paged KV cache holds. [default: as `trtc run`]")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]), help="[default: cuda if there is a GPU]")
@speculative_options
@click.option("--enable_lora", is_flag=True, default=None,
              help="Serve LoRA adapters: --lora_modules, or loaded at run time (POST /v1/load_lora_adapter).")
@click.option("--lora_modules", multiple=True, default=None,
              help="NAME=PATH: a PEFT LoRA adapter served as model NAME (repeat the flag for more); implies --enable_lora.")
@click.option("--max_loras", default=None, type=click.IntRange(min=1),
              help="Adapters held on the device at once (LRU over the rest). [default: 4]")
@click.option("--max_lora_rank", default=None, type=click.IntRange(min=1), help="The largest adapter rank. [default: 16]")
@click.option("--tool_call_parser", default=None, type=click.Choice(list(TOOL_PARSERS)),
              help="Parse tool calls out of replies to requests with tools and tool_choice 'auto': hermes "
                   "(Hermes, Qwen 2.5/3 <tool_call> blocks) or llama3_json (Llama 3.x JSON calls).")
@click.option("--reasoning_parser", default=None, type=click.Choice(list(REASONING_PARSERS)),
              help="Split <think>...</think> out of chat replies into reasoning_content.")
@click.option("--api_server_count", default=None, type=click.IntRange(min=1),
              help="HTTP front processes (parsing, detokenization, SSE) over the one engine core, on one port: "
                   "more keep up with more streams. [default: 1]")
@click.option("--log_level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="uvicorn's log level. [default: info]")
@click.option("--config", "config_file", default=None, type=click.Path(), help="A serve.yaml with any of these options.")
@user_errors
def serve(model, config_file, **flags) -> None:
    """Serve MODEL (an engine directory or an HF directory) over an OpenAI-compatible HTTP API."""
    from trtc.serve.server import ServeConfig, read_config
    from trtc.serve.server import serve as run_serve

    options = read_config(config_file) if config_file else {}
    options.update({k: v for k, v in flags.items() if v is not None and v != ()})  # () : a multiple flag not given
    run_serve(ServeConfig(model=model, **options))


def _bench_url(url, request_rate, range_ratio, api_key, isl, osl, num_requests, levels, client_processes,
               output_json) -> None:
    import os

    from trtc.tools.serve_bench import format_serve_result, run_serve_bench

    results = []
    for concurrency in levels:
        results.append(run_serve_bench(url.rstrip("/"), None, isl, osl, num_requests, concurrency, request_rate,
                                       range_ratio, api_key=api_key or os.environ.get("TRTC_API_KEY"),
                                       processes=client_processes))
        click.echo(format_serve_result(results[-1]))
    _write_bench_json(output_json, results, len(levels) > 1)
    if any(r.errors for r in results):
        sys.exit(1)


def _write_bench_json(output_json, results: list, sweep: bool) -> None:
    """One run's figures as an object; a sweep's as a list, one object per --concurrency value."""
    import json

    if output_json:
        data = [r.to_dict() for r in results] if sweep else results[0].to_dict()
        Path(output_json).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
