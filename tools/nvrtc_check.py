"""Compiles every CUDA kernel source with NVRTC exactly as the pipelines do when they load
(`pipelines/src/kernels.rs::ptx`: common.cuh prepended, `--gpu-architecture=compute_XX -std=c++17`), for
compute_80 and compute_90, plus the variants the GPU tools compile (bench/kernel_harness.py's XA_SKIP_DEAD=0,
bench/dwtile_variants.cu after dwconv.cu). NVRTC needs no GPU, so an error in GPU code fails CI here instead
of at a worker's start on a GPU machine. Usage: python3 tools/nvrtc_check.py <dir with libnvrtc.so>"""
import ctypes
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
K = os.path.join(ROOT, "pipelines", "src", "kernels")
ARCHS = ("compute_80", "compute_90")


def load(libdir):
    ctypes.CDLL(os.path.join(libdir, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(os.path.join(libdir, "libnvrtc.so"))


def compile_one(lib, name, code, opts):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), name.encode(), 0, None, None) != 0:
        return False, "nvrtcCreateProgram failed"
    raw = [o.encode() for o in opts]
    rc = lib.nvrtcCompileProgram(prog, len(raw), (ctypes.c_char_p * len(raw))(*raw))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(max(size.value, 1))
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace")


def main():
    lib = load(sys.argv[1])
    common = open(os.path.join(K, "common.cuh")).read()
    read = lambda p: open(p).read()
    units = [(f, read(os.path.join(K, f)), ()) for f in sorted(os.listdir(K)) if f.endswith(".cu")]
    units.append(("attention.cu XA_SKIP_DEAD=0", read(os.path.join(K, "attention.cu")), ("-DXA_SKIP_DEAD=0",)))
    units.append(("dwconv.cu + bench/dwtile_variants.cu",
                  read(os.path.join(K, "dwconv.cu")) + read(os.path.join(ROOT, "bench", "dwtile_variants.cu")), ()))
    failed = 0
    for name, code, extra in units:
        for arch in ARCHS:
            ok, log = compile_one(lib, name.split()[0], f"{common}\n{code}", [f"--gpu-architecture={arch}", "-std=c++17", *extra])
            print(f"{'ok  ' if ok else 'FAIL'} {name} ({arch})")
            if not ok:
                failed += 1
                print(log)
    if failed:
        sys.exit(f"{failed} NVRTC compile(s) failed")


if __name__ == "__main__":
    main()
