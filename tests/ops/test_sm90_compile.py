"""Triton kernels compile for an H100 (sm_90) here, without a GPU.

test_every_kernel_compiles_as_launched: every op's Triton path runs on CPU tensors with a
stand-in driver, and every launch is compiled for sm_90 instead (tests/sm90_launch.py): the
argument types and tiles are those of the real launchers. The sampler also compiles for every
autotune candidate without register spills (test_sampler_compiles_for_sm90_without_spills).

The interpreter runs the kernels' logic but not Triton's compiler: a construct the interpreter
accepts can still fail to compile for a GPU, and a tile can spill registers. Triton can compile
for a named target with no driver, and its wheel ships ptxas; this runs both for every tile the
autotuner may pick. It runs in a subprocess: tests/conftest.py turns the interpreter on before
the kernels are decorated, and an interpreted kernel cannot be compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
_ON_GPU = torch.cuda.is_available()

_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
import dlm_kernels.ops.unmask_sample as us

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
signature = {
    "logits_ptr": "*bf16", "stride_row": "i64", "rows_ptr": "*i64", "valid_ptr": "*i1",
    "temp_ptr": "*fp64", "topk_ptr": "*i64", "topp_ptr": "*fp64", "minp_ptr": "*fp64",
    "tok_ptr": "*i64", "conf_ptr": "*fp32", "V": "i32", "offset": "i32",
    "seeds_ptr": "*i64", "offsets_ptr": "*i32",
}
fn = us._sample_rows_kernel
tmp = tempfile.mkdtemp()
configs = us._sample_configs(151936)
# The scalar seed's type is what the launcher gets: i64 for a drawn 62-bit seed, i32 for a small
# one and for the 0 passed with per-row keys (a kernel that retypes it does not compile).
# The logits' dtype sets the key shift (us._KEY_SHIFT): bf16 everywhere, fp16 and float32 once.
# GREEDY: the kernel with the one-pass greedy path alone (every row at T 0, no filter).
none = (False, False, False)
cases = [(0, (False, True, False), False, 2**40, configs, "bf16", False),
         (2, (True, True, True), True, 0, configs, "bf16", False),
         (2, (True, True, True), False, 7, configs[:1], "bf16", False),
         (1, (True, True, True), False, 7, configs[:1], "bf16", False),
         (2, (True, True, True), False, 7, configs[:1], "fp16", False),
         (2, (True, True, True), False, 7, configs[:1], "fp32", False),
         (0, none, False, 7, configs, "bf16", True),
         (1, none, True, 0, configs[:1], "fp32", True),
         (2, none, False, 7, configs[:1], "bf16", True),
         (3, none, False, 7, configs[:1], "fp16", True)]
shifts = {"bf16": 16, "fp16": 13, "fp32": 0}
for mode, flags, per_row, seed, cfgs, dt, greedy in cases:
    for cfg in cfgs:
        consts = dict(MODE=mode, HAS_TOPK=flags[0], HAS_TOPP=flags[1], HAS_MINP=flags[2],
                      PER_ROW_KEY=per_row, SHIFT=shifts[dt], GREEDY=greedy,
                      CHUNK=4 if dt == "fp32" else 8, FAST_EXP=True,
                      **dict(cfg.kwargs, STAGES=us._stages(cfg.kwargs["BLOCK_V"], mode)))
        sig = dict(signature, logits_ptr="*" + dt, seed=mangle_type(seed),
                   **{k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": cfg.num_warps})
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(out.asm["ptx"])
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                              capture_output=True, text=True, check=True).stderr
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", info)]
        if not spills or max(spills) != 0:
            sys.exit(f"mode {mode} {flags} {dt} {cfg}: {info}")
        print("ok", mode, flags, dt, greedy, cfg.kwargs, cfg.num_warps)
"""


def _ptxas() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(_ptxas() is None, reason="this triton wheel ships no ptxas")
@pytest.mark.skipif(_ON_GPU, reason="the GPU check's time goes to the real kernels")
def test_sampler_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    import dlm_kernels.ops.unmask_sample as us

    assert res.stdout.count("ok") == 3 * len(us._sample_configs(151936)) + 7, res.stdout


_KERNELS = (
    "_attn_bwd_dkdv_kernel _attn_bwd_dq_kernel _attn_bwd_preprocess_kernel _attn_fwd_kernel "
    "_head_rows_kernel _lce_bwd_atomic_kernel _lce_bwd_dh_kernel _lce_bwd_dw_kernel "
    "_lce_fwd_kernel _mce_bwd_kernel _mce_fwd_kernel _rms_norm_kernel _rope_kernel "
    "_sample_rows_kernel _slab_bwd_kernel _slab_fwd_kernel"
).split()


@pytest.mark.skipif(_ptxas() is None, reason="this triton wheel ships no ptxas")
@pytest.mark.skipif(_ON_GPU, reason="on a GPU the real launches compile every kernel")
def test_every_kernel_compiles_as_launched():
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "sm90_launch.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Two processes, each compiling every second op call's kernels: the compiles are
    # single-threaded and this test runs alone, so the second core halves its time.
    n = 2
    procs = [subprocess.Popen([sys.executable, script, "--part", f"{i}/{n}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]  # fmt: skip
    outs = [p.communicate(timeout=900) for p in procs]
    stdout = "".join(o for o, _ in outs)
    tail = stdout[-6000:] + "".join(e[-1500:] for _, e in outs)
    assert all(p.returncode == 0 for p in procs), tail
    summaries = " ".join(o.strip().splitlines()[-1] for o, _ in outs)
    missing = [k for k in _KERNELS if k not in summaries]  # an op that skipped its Triton path
    assert not missing, f"never launched: {missing}\n{tail}"
    # Every 16-bit matmul kernel at head dims up to 128 (all of LLaDA's and Dream's) must use
    # Hopper's wgmma: a dot that falls back to mma.sync runs at about half the tensor-core rate.
    slow = [
        line for line in stdout.splitlines()
        if line.startswith("ok ") and re.search(r" s\d+ (bf16|fp16)(/fp32)? \{", line)
        and re.search(r"_(attn_fwd|attn_bwd_dkdv|attn_bwd_dq|lce_\w+|head_rows)_kernel", line)
        and int(re.search(r"'HEAD_DIM': (\d+)", line).group(1) if "HEAD_DIM" in line else 0) <= 128
        and not re.search(r"wgmma +[1-9]", line)
    ]  # fmt: skip
    assert not slow, "no wgmma in:\n" + "\n".join(slow)
