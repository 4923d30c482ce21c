"""`trtc quantize`: HF model -> quantized trtc checkpoint, calibrated by NVIDIA ModelOpt.

    HF model (torch; float32 on CPU, the model's dtype on CUDA)
      -> modelopt.torch.quantization.quantize(model, cfg, forward_loop over the calibration windows)
      -> modelopt.torch.export.export_hf_checkpoint (ModelOpt's unified HF export, a temp directory)
      -> trtc convert (converters/quantized.py, the importer of pre-quantized ModelOpt checkpoints)

trtc has no calibration algorithm of its own: the scales and weights are ModelOpt's, so an engine
reproduces ModelOpt's fake-quantized model. Recipes (ModelOpt's names):
    fp8        FP8_DEFAULT_CFG: per-tensor FP8 weights and activations, max calibration
    int4_awq   INT4_AWQ_CFG: INT4 weights in groups of --awq_block_size, AWQ's search:
               --awq_algorithm clip (trtc's default: the clipping range of each group), lite
               (ModelOpt's and TensorRT-LLM's default: per-channel activation-aware scales), full (both)
    int4_gptq  the INT4_AWQ_CFG quantizers with the "gptq" algorithm, layer by layer (each
               layer's Hessian from the outputs of the layers already quantized, as in GPTQ)
    --kv_cache_dtype fp8 adds FP8_KV_CFG (per-tensor FP8 K and V, max calibration).
On books-16M (benchmarks/quant_accuracy.py, README) AWQ clip beats lite clearly (+3.7% and +1.8%
perplexity over bf16 against +4.4% and +5.4%), so clip is the default: INT4 accuracy first; layerwise GPTQ beats the
all-at-once one on Alice (79.66 vs 80.23) and trails it on Sherlock Holmes (61.27 vs 61.14).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from trtc.converters import architecture_for
from trtc.converters.hf_checkpoint import TOKENIZER_FILES, HFCheckpoint
from trtc.converters.tp import validate_quantized_split
from trtc.errors import TrtcError
from trtc.formats.checkpoint import DTYPES, torch_dtype
from trtc.formats.mapping import Mapping
from trtc.formats.quant_layout import GROUP_SIZES, QuantConfig
from trtc.quantization.calibration import (
    DEFAULT_CALIBRATION_TEXT,
    calibration_batches,
    read_texts,
)
from trtc.quantization.fused_experts import fused_experts_export
from trtc.utils.atomic_dir import check_output_dir

QFORMATS = {"fp8": "FP8", "int4_awq": "W4A16_AWQ", "int4_gptq": "W4A16_GPTQ"}
AWQ_ALGORITHMS = ("lite", "clip", "full")


def modelopt_quantization():
    """modelopt.torch.quantization, imported quietly (it warns about untested transformers versions)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise TrtcError(f"quantization needs NVIDIA ModelOpt (pip install 'nvidia-modelopt>=0.44'): {e}") from None
    return mtq


def quant_cfg(qformat: str, kv_cache_fp8: bool = False, group_size: int = 128, awq_algorithm: str = "lite") -> dict:
    """The ModelOpt config of a --qformat (handles the list-style quant_cfg of ModelOpt >= 0.45 and
    the dict style of earlier versions)."""
    mtq = modelopt_quantization()
    if qformat not in QFORMATS:
        raise TrtcError(f"--qformat {qformat!r} is not supported; use one of: {', '.join(QFORMATS)}")
    if awq_algorithm not in AWQ_ALGORITHMS:
        raise TrtcError(f"--awq_algorithm {awq_algorithm!r} is not one of: {', '.join(AWQ_ALGORITHMS)}")
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG if qformat == "fp8" else mtq.INT4_AWQ_CFG)
    entries = cfg["quant_cfg"]
    if qformat != "fp8":
        block = {-1: group_size, "type": "static"}
        if isinstance(entries, dict):
            entries["*weight_quantizer"]["block_sizes"] = block
        else:
            for e in entries:
                if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e:
                    e["cfg"]["block_sizes"] = block
    if qformat == "int4_awq" and awq_algorithm != "lite":
        cfg["algorithm"] = {"method": f"awq_{awq_algorithm}"}
    if qformat == "int4_gptq":
        cfg["algorithm"] = {"method": "gptq"}
        if _has_layerwise():
            cfg["algorithm"]["layerwise"] = {"enable": True}
    if kv_cache_fp8:
        kv = copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
        if isinstance(entries, dict):
            entries.update(kv)
        else:
            entries.extend(kv)
    return cfg


def algorithm_name(qformat: str, awq_algorithm: str = "lite") -> str:
    """The calibration algorithm a --qformat runs, as the checkpoint records it."""
    if qformat == "fp8":
        return "max"
    if qformat == "int4_awq":
        return f"awq_{awq_algorithm}"
    return "gptq (layerwise)" if _has_layerwise() else "gptq"


def _has_layerwise() -> bool:
    from modelopt.torch.quantization import config

    return hasattr(config, "LayerwiseConfig")


def calibrate(model: torch.nn.Module, qformat: str, batches: list[torch.Tensor], kv_cache_fp8: bool = False,
              group_size: int = 128, awq_algorithm: str = "lite", progress: bool | None = False) -> torch.nn.Module:
    """Quantize `model` in place with ModelOpt (fake-quantized afterwards); returns it. `progress`:
    a bar of calibration windows per pass over them (None: on a terminal only)."""
    mtq = modelopt_quantization()
    cfg = quant_cfg(qformat, kv_cache_fp8, group_size, awq_algorithm)
    device = next(model.parameters()).device
    # made before _quiet swaps stderr, so the bar reaches the terminal
    bar = tqdm(total=sum(len(b) for b in batches), unit="window", disable=None if progress is None else not progress,
               file=sys.stderr, leave=False)
    passes = 0

    def forward_loop(m):
        nonlocal passes
        passes += 1
        bar.reset()
        bar.set_description(f"calibrate (pass {passes})")
        for batch in batches:
            m(batch.to(device), use_cache=False)
            bar.update(len(batch))

    with bar, torch.no_grad(), _quiet("ModelOpt calibration"):
        mtq.quantize(model, cfg, forward_loop)
    return model


def export(model: torch.nn.Module, export_dir: Path) -> None:
    """ModelOpt's unified HF export of a calibrated model (quantized weights, scales, hf_quant_config.json);
    INT4 fused experts (transformers 5) through trtc's handler (quantization/fused_experts.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export import export_hf_checkpoint
    with _quiet("ModelOpt export"), fused_experts_export():
        export_hf_checkpoint(model, export_dir=str(export_dir))


def quantize(
    model_dir: str | Path,
    output_dir: str | Path,
    qformat: str,
    calib_dataset: list[str | Path] | None = None,
    kv_cache_dtype: str | None = None,
    calib_size: int = 512,
    calib_max_seq_length: int = 512,
    batch_size: int = 8,
    awq_block_size: int = 128,
    awq_algorithm: str = "clip",
    tp_size: int = 1,
    dtype: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Quantize the HF model in `model_dir` into a trtc checkpoint at `output_dir`. The checkpoint's
    quantization record holds the calibration (datasets, windows, tokens used), which the quantization
    report (trtc/tools/quant_report.py) reads to hold the rest of the text out."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    calib_dataset = list(calib_dataset or [DEFAULT_CALIBRATION_TEXT])
    if qformat not in QFORMATS:
        raise TrtcError(f"--qformat {qformat!r} is not supported; use one of: {', '.join(QFORMATS)}")
    if kv_cache_dtype not in (None, "auto", "fp8"):
        raise TrtcError(f"--kv_cache_dtype {kv_cache_dtype!r}: quantize takes fp8 (or leave it unset)")
    if awq_algorithm not in AWQ_ALGORITHMS:
        raise TrtcError(f"--awq_algorithm {awq_algorithm!r} is not one of: {', '.join(AWQ_ALGORITHMS)}")
    if awq_block_size not in GROUP_SIZES:
        raise TrtcError(f"--group_size {awq_block_size} is not supported; use one of: {', '.join(map(str, GROUP_SIZES))}")
    if dtype != "auto":
        torch_dtype(dtype)
    check_output_dir(output_dir, overwrite)
    hf = HFCheckpoint(model_dir)  # refuses missing / pickle-only weights
    if hf.config.get("quantization_config") or (model_dir / "hf_quant_config.json").is_file():
        raise TrtcError(f"{model_dir} is already quantized; import it with `trtc convert` instead")
    graph = architecture_for(hf.config).graph_from_config(hf.config)
    mapping = Mapping.for_tp(tp_size)
    mapping.validate(graph)
    kv_fp8 = kv_cache_dtype == "fp8"
    planned = QuantConfig(quant_algo=QFORMATS[qformat], kv_cache_quant_algo="FP8" if kv_fp8 else None,
                          group_size=awq_block_size)
    graph.weight_shapes(planned)  # group size must divide every in-features
    validate_quantized_split(graph, mapping, planned)
    read_texts(calib_dataset)  # fail on a bad file before loading the model
    run_device = _device(device)
    if dtype == "auto":
        name = hf.config.get("dtype") or hf.config.get("torch_dtype")
        dtype = name if name in DTYPES else "float32"

    tokenizer = load_tokenizer(model_dir)
    bos = graph.bos_token_id
    batches = calibration_batches(tokenizer, calib_dataset, calib_size, calib_max_seq_length, batch_size, bos)
    model = _load_model(model_dir, run_device, dtype)
    calibrate(model, qformat, batches, kv_fp8, awq_block_size, awq_algorithm, progress)

    from trtc.converters.convert import convert

    used = sum(b.numel() for b in batches) - (sum(len(b) for b in batches) if bos is not None else 0)  # BOS excluded
    with tempfile.TemporaryDirectory(prefix="trtc-quantize-") as tmp:
        hf_out = Path(tmp) / "hf"
        export(model, hf_out)
        del model
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file() and not (hf_out / name).is_file():
                shutil.copyfile(model_dir / name, hf_out / name)
        _record(hf_out, qformat, {
            "dataset": [Path(p).name for p in calib_dataset], "windows": sum(len(b) for b in batches),
            "window_len": calib_max_seq_length, "bos": bos is not None, "tokens": used, "algorithm": algorithm_name(qformat, awq_algorithm),
            "device": str(run_device),
        })
        convert(hf_out, output_dir, tp_size=tp_size, dtype=dtype, overwrite=overwrite, progress=progress)
    return output_dir


def _record(hf_out: Path, qformat: str, calibration: dict) -> None:
    """Name the algorithm (ModelOpt exports GPTQ as W4A16_AWQ: the same tensors) and record the calibration."""
    path = hf_out / "hf_quant_config.json"
    if not path.is_file():
        raise TrtcError("ModelOpt's export wrote no hf_quant_config.json; this ModelOpt version is not supported (need >= 0.44)")
    d = json.loads(path.read_text())
    d["quantization"]["quant_algo"] = QFORMATS[qformat]
    d["quantization"]["calibration"] = calibration
    path.write_text(json.dumps(d, indent=2) + "\n")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise TrtcError(f"--device {device!r} is not one of: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrtcError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    return torch.device(device)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise TrtcError(f"could not load the tokenizer of {model_dir} ({e}); calibration needs the model's tokenizer files") from None


def _load_model(model_dir: Path, device: torch.device, dtype: str) -> torch.nn.Module:
    """Float32 on CPU (exact calibration statistics); the checkpoint's dtype on a GPU."""
    from transformers import AutoModelForCausalLM

    load_dtype = torch.float32 if device.type == "cpu" else torch_dtype(dtype)
    with _quiet(f"loading {model_dir} with transformers"):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=load_dtype, use_safetensors=True)
    return model.to(device).eval()


@contextlib.contextmanager
def _quiet(step: str):
    """ModelOpt prints every quantizer; keep the CLI's output to trtc's lines. A failure inside is
    one line naming the step."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        except TrtcError:
            raise
        except Exception as e:
            raise TrtcError(f"{step} failed ({type(e).__name__}: {e})") from None
