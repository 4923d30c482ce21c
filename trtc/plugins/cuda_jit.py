"""trtc's CUDA C++ kernels, compiled on first use and cached.

The sources (trtc/plugins/*/csrc/*.cu) are compiled by NVRTC, the runtime compiler that every
CUDA build of PyTorch ships (no nvcc needed), to a cubin for the GPU at hand, cached under
$TRTC_CACHE_DIR/kernels (default ~/.cache/trtc/kernels) by a hash of the source, the kernels, the
architecture and the NVRTC version; later processes load the cubin. Kernels are launched through
the CUDA driver API on PyTorch's current stream, so they are captured by CUDA graphs like any other.

    module = CudaModule(source_path, ["my_kernel<true, 4>", ...])
    module.launch("my_kernel<true, 4>", grid, block, [tensor_or_none, 3, ...])
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from trtc.errors import TrtcError
from trtc.utils.cache import cache_home


def _nvrtc() -> ctypes.CDLL:
    """The NVRTC of PyTorch's CUDA major version: the one PyTorch loaded, else its pip wheel's."""
    major = (torch.version.cuda or "0").split(".")[0]
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"]
    for site in sys.path:
        names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", f"libnvrtc.so.{major}*")))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise TrtcError(f"NVRTC (libnvrtc.so.{major}) was not found; install the nvidia-cuda-nvrtc wheel of "
                    f"CUDA {major} (PyTorch's CUDA builds depend on it)")


def _check_nvrtc(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise TrtcError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(code).decode()}")


def compile_cubin(source: str, name_expressions: list[str], arch: str, defines: tuple[str, ...] = ()) -> tuple[bytes, dict[str, str]]:
    """NVRTC: `source` -> (cubin for sm_`arch`, {name expression: lowered (mangled) name})."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check_nvrtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"trtc.cu", 0, None, None), "create")
    try:
        for name in name_expressions:
            _check_nvrtc(lib, lib.nvrtcAddNameExpression(prog, name.encode()), "name expression")
        opts = [f"--gpu-architecture=sm_{arch}", "--std=c++17", *defines]
        opts_c = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        code = lib.nvrtcCompileProgram(prog, len(opts), opts_c)
        if code != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise TrtcError(f"compiling trtc's CUDA kernels for sm_{arch} failed:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = {}
        for name in name_expressions:
            out = ctypes.c_char_p()
            _check_nvrtc(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)), "lowered name")
            lowered[name] = out.value.decode()
        return cubin.raw, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def nvrtc_version() -> str:
    lib = _nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


_libcuda: ctypes.CDLL | None = None
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _driver() -> ctypes.CDLL:
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
        _libcuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        _libcuda.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return _libcuda


def _check_cuda(code: int, what: str) -> None:
    if code != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(code, ctypes.byref(msg))
        raise RuntimeError(f"CUDA {what} failed: {msg.value.decode() if msg.value else code}")


class CudaModule:
    """The kernels `name_expressions` (template instantiations spelled as in C++) of one source
    file, compiled once per GPU architecture and loaded once per device."""

    def __init__(self, source_path: Path, name_expressions: list[str], defines: tuple[str, ...] = ()) -> None:
        """defines: NVRTC options such as "-DNAME=VALUE" (benchmarks compile other shapes of a kernel)."""
        self.source_path, self.names, self.defines = Path(source_path), list(name_expressions), tuple(defines)
        self._functions: dict[int, dict[str, ctypes.c_void_p]] = {}  # device index -> name -> CUfunction
        self._shared_allowed: dict[tuple[int | None, str], int] = {}  # (device index, name) -> dynamic shared bytes

    def _cubin(self, arch: str) -> tuple[bytes, dict[str, str]]:
        source = self.source_path.read_text()
        key = hashlib.sha256("\0".join([source, *self.names, *self.defines, arch, nvrtc_version()]).encode()).hexdigest()[:20]
        directory = cache_home() / "kernels"
        path = directory / f"{self.source_path.stem}-sm{arch}-{key}.cubin"
        names_path = path.with_suffix(".names")
        if path.is_file() and names_path.is_file():
            lowered = dict(line.split("\t", 1) for line in names_path.read_text().splitlines())
            if set(lowered) == set(self.names):
                return path.read_bytes(), lowered
        cubin, lowered = compile_cubin(source, self.names, arch, self.defines)
        directory.mkdir(parents=True, exist_ok=True)
        for target, data in ((names_path, "\n".join(f"{k}\t{v}" for k, v in lowered.items()).encode()), (path, cubin)):
            fd, tmp = tempfile.mkstemp(dir=directory)  # other ranks may compile the same file at once
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return cubin, lowered

    def _load(self, device: torch.device) -> dict[str, ctypes.c_void_p]:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._functions:
            major, minor = torch.cuda.get_device_capability(index)
            cubin, lowered = self._cubin(f"{major}{minor}")
            with torch.cuda.device(index):
                torch.cuda.synchronize()  # makes the device's primary context current on this thread
                module = ctypes.c_void_p()
                _check_cuda(_driver().cuModuleLoadData(ctypes.byref(module), cubin), "module load")
                functions = {}
                for name, mangled in lowered.items():
                    fn = ctypes.c_void_p()
                    _check_cuda(_driver().cuModuleGetFunction(ctypes.byref(fn), module, mangled.encode()), "get function")
                    functions[name] = fn
            self._functions[index] = functions
        return self._functions[index]

    def prepare(self, device: torch.device) -> None:
        """Compile (or read the cache) and load now, e.g. before a CUDA graph capture."""
        self._load(device)

    def launch(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: list,
               device: torch.device, shared_bytes: int = 0) -> None:
        """args: tensors (or None: a null pointer) and ints (C int), in the kernel's order;
        shared_bytes: the kernel's dynamic shared memory (past 48 KiB it is allowed once per function)."""
        fn = self._load(device)[name]
        if shared_bytes > self._shared_allowed.get((device.index, name), 48 << 10):
            _check_cuda(_driver().cuFuncSetAttribute(fn, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes),
                        f"shared memory of {name}")
            self._shared_allowed[(device.index, name)] = shared_bytes
        values = [ctypes.c_void_p(a.data_ptr() if a is not None else 0) if (a is None or isinstance(a, torch.Tensor))
                  else ctypes.c_int(a) for a in args]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        stream = torch.cuda.current_stream(device).cuda_stream
        _check_cuda(_driver().cuLaunchKernel(fn, *grid, *block, shared_bytes, stream, ctypes.cast(params, ctypes.c_void_p), None),
                    f"launch of {name}")
