"""`trtc build`: the checks between flags, the memory plan (`--dry_run` stops after it), and the
build itself (trtc/compiler/build.py), with the resolved flags recorded in the engine's config.json."""

from __future__ import annotations

import json

import click

from trtc.cli_config import resolved_flags
from trtc.errors import TrtcError


def run_build(checkpoint_dir, model_dir, output_dir, tp_size, dtype, qformats, calib_dataset, calib_size,
              calib_max_seq_length, awq_block_size, awq_algorithm, overwrite, backend, target, gpu_memory, dry_run,
              output_json, limits: dict, progress: bool | None = None) -> None:
    from trtc.compiler.build import build, build_from_hf, plan_checkpoint_build, plan_hf_build
    from trtc.compiler.targets import resolve_target
    from trtc.formats.build_config import BuildConfig

    if (checkpoint_dir is None) == (model_dir is None):
        raise TrtcError("pass exactly one of --checkpoint_dir (from `trtc convert`), --model_dir (an HF directory "
                        "or Hub model id) or --from_onnx (a `--backend tensorrt` build to finish)")
    if output_dir is None and not dry_run:
        raise TrtcError("--output_dir is missing; pass where to write the engine (or --dry_run for the memory plan only)")
    if len(set(qformats)) > 1:
        raise TrtcError(f"{' and '.join('--' + q for q in sorted(set(qformats)))} exclude each other; pick one weight format")
    if calib_dataset and not qformats:
        raise TrtcError("--calib_dataset calibrates a quantization; add --fp8, --int4_awq or --int4_gptq")
    config = BuildConfig(**limits)
    ctx = click.get_current_context()
    flags = resolved_flags(ctx)
    for name in ("output_dir", "overwrite", "dry_run", "output_json"):  # where it went, not what was built
        flags.pop(name, None)
        flags["sources"].pop(name, None)
    quantize = None
    if model_dir is not None:
        from trtc.converters.hub import resolve_model_dir

        model_dir = resolve_model_dir(model_dir, ctx.params.get("revision"))
        if qformats:
            quantize = dict(qformat=qformats[0], calib_dataset=list(calib_dataset), calib_size=calib_size,
                            calib_max_seq_length=calib_max_seq_length, awq_block_size=awq_block_size,
                            awq_algorithm=awq_algorithm)
    else:
        if tp_size != 1 or dtype != "auto":
            raise TrtcError("--tp and --dtype are decided at convert time; pass them to `trtc convert` or use --model_dir")
        if qformats:
            raise TrtcError(f"--{qformats[0]} quantizes an HF model; use it with --model_dir, or `trtc quantize` then build")
    if dry_run:
        from pathlib import Path

        target_config = resolve_target(target)
        if model_dir is not None:
            plan = plan_hf_build(model_dir, tp_size, dtype, config, quantize, target_config, gpu_memory)
        else:
            plan = plan_checkpoint_build(Path(checkpoint_dir), config, target_config, gpu_memory)[2]
        for line in plan.lines():
            click.echo(line)
        if output_json:
            Path(output_json).write_text(json.dumps({"memory_plan": plan.to_dict(), "target": target_config}, indent=2)
                                         + "\n")
        plan.check()
        click.echo("dry run: the plan fits" if plan.fits() else "dry run: nothing built (no GPU memory to check against; "
                   "pass --gpu_memory GiB or --target h200)")
        return
    if model_dir is not None:
        out = build_from_hf(model_dir, output_dir, tp_size, dtype, config, backend, overwrite, progress, quantize=quantize,
                            target=target, gpu_memory=gpu_memory, build_flags=flags)
    else:
        out = build(checkpoint_dir, output_dir, config, backend, overwrite, progress, target=target, gpu_memory=gpu_memory,
                    build_flags=flags)
    click.echo(f"wrote engine {out}")
