"""Run every op's Triton path on CPU tensors, compiling each kernel launch for an H100 (sm_90).

    python tests/sm90_launch.py            # prints one line per kernel variant, then a summary
    python tests/sm90_launch.py --part 0/2 # every second op call from the first (parallel runs)

No GPU and no interpreter: Triton is given a stand-in driver that names sm_90 as the target,
and its jit cache hook compiles every launch the ops make (Triton's compiler, then the wheel's
ptxas for registers and spills) and skips the launch itself. The ops then carry on with unset
outputs, which is fine: only the launches matter here. Each kernel is compiled with the argument
types, specialisations and tiles the real launchers give it on a GPU (DLM_KERNELS_AUTOTUNE=0:
each kernel's default tile), which the interpreter never checks: a construct the interpreter
accepts (a variable retyped in a branch, say) can fail to compile.

Exit status 1 if a kernel fails to compile or an op call fails. Run by
tests/ops/test_sm90_compile.py in a subprocess (the hook and the driver are process-wide).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

# Run as a script, sys.path[0] is tests/, where tests/dlm would shadow the dlm package (an
# editable install's finder hides that; a plain checkout or a regular install does not): the
# repository root instead, as pytest sees it.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)
os.environ.pop("TRITON_INTERPRET", None)
os.environ["DLM_KERNELS_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


class _Sm90Driver:
    """What JITFunction.run asks of the driver before it compiles."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


RESULTS: dict = {}  # one entry per distinct compiled variant
_TMP = tempfile.mkdtemp()


def _compile_hook(key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002
    jf = fn.jit_function
    consts = dict(compile["constants"])
    warps, stages = compile["num_warps"], compile["num_stages"]
    ident = (fn.name, str(compile["signature"]), str(sorted(consts.items(), key=str)), warps,
             stages)  # fmt: skip
    if ident in RESULTS:
        return True
    names = jf.arg_names
    meta = {names[k[0]]: v for k, v in consts.items() if isinstance(k, tuple) and len(k) == 1}
    meta = {k: v for k, v in meta.items() if k.isupper()}
    dtypes = sorted({t[1:] for t in compile["signature"].values()
                     if isinstance(t, str) and t[1:] in ("bf16", "fp16", "fp32")})  # fmt: skip
    label = f"{fn.name} w{warps} s{stages} {'/'.join(dtypes)} {meta}"
    try:
        src = ASTSource(jf, compile["signature"], consts, compile["configs"][0])
        out = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
        path = os.path.join(_TMP, "k.ptx")
        with open(path, "w") as f:
            f.write(out.asm["ptx"])
        info = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                              capture_output=True, text=True, check=True).stderr  # fmt: skip
        regs = max([int(n) for n in re.findall(r"Used (\d+) registers", info)] or [0])
        spill = max([int(n) for n in re.findall(r"(\d+) bytes spill stores", info)] or [0])
        # Tensor-core instructions: Hopper's wgmma, or the older mma.sync a dot falls back to
        # (half wgmma's rate on an H100): which one each dot became is read from the PTX.
        ptx = out.asm["ptx"]
        mma = f"wgmma {ptx.count('wgmma.mma_async'):3d} mma.sync {ptx.count('mma.sync'):3d}"
        RESULTS[ident] = ("ok", fn.name, f"regs {regs:3d} spill {spill:5d} smem "
                          f"{out.metadata.shared:6d} {mma}  {label}")  # fmt: skip
    except Exception as e:  # noqa: BLE001 - report every failure, then fail at the end
        RESULTS[ident] = ("FAIL", fn.name, f"{label}: {type(e).__name__}: {str(e)[-800:]}")
    return True  # compiled (or failed): never launch


def _install() -> None:
    triton.runtime.driver.set_active(_Sm90Driver())
    knobs.runtime.jit_cache_hook = _compile_hook
    from dlm_kernels import dispatch

    # The ops take their Triton path for these CPU tensors, with the GPU tiles.
    dispatch.select = lambda device, *, has_triton=True, has_cpp=True: (
        "triton" if has_triton else "reference"
    )
    dispatch.triton_interpret = lambda: False


def _calls():
    """(name, thunk) for every op and the variants that change a kernel's compiled code."""
    import dlm_kernels as dk

    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    att = dk.bidirectional_attention
    out = []
    for dt in (bf, f32):
        for V in (32000, 1003):  # aligned and odd (Triton specialises on divisibility by 16)
            x = torch.randn(64, V, dtype=dt, requires_grad=True)
            t, m, w = torch.randint(0, V, (64,)), torch.rand(64) < 0.5, torch.rand(64)
            out.append((f"masked_cross_entropy {dt} V{V}", lambda x=x, t=t, m=m, w=w: (
                dk.masked_cross_entropy(x, t, m, w, label_smoothing=0.1, z_loss=1e-4).backward(),
                dk.masked_cross_entropy(x, t, m).backward()),
            ))  # fmt: skip
    os.environ["DLM_KERNELS_LCE"] = "fused"  # the Triton kernels, not the cuBLAS slabs
    for dt in (bf, f32):
        for H, V in ((512, 32000), (40, 1003)):  # only sizes' divisibility by 16 matters here
            h = torch.randn(64, H, dtype=dt, requires_grad=True)
            W = torch.randn(V, H, dtype=dt, requires_grad=True)
            b = torch.randn(V, dtype=dt, requires_grad=True)
            t, m = torch.randint(0, V, (64,)), torch.rand(64) < 0.5
            out.append((f"masked_linear_cross_entropy {dt} H{H} V{V}", lambda h=h, W=W, b=b, t=t,
                        m=m: (dk.masked_linear_cross_entropy(
                            h, W, t, m, torch.rand(64), bias=b, label_smoothing=0.1, z_loss=1e-4,
                            softcap=30.0).backward(),
                        dk.masked_linear_cross_entropy(h, W, t, m, deterministic=False).backward(),
                        dk.masked_linear_cross_entropy(h, W, t, m).backward()),
            ))  # fmt: skip

    def slab(h, W, b, t, m):  # the eager CUDA path: cuBLAS slabs and two elementwise kernels
        prev = os.environ["DLM_KERNELS_LCE"]
        os.environ["DLM_KERNELS_LCE"] = "slab"
        try:
            dk.masked_linear_cross_entropy(
                h, W, t, m, torch.rand(64), bias=b, label_smoothing=0.1, z_loss=1e-4, softcap=30.0
            ).backward()
            dk.masked_linear_cross_entropy(h, W, t, m).backward()
        finally:
            os.environ["DLM_KERNELS_LCE"] = prev

    for dt in (bf, f32):
        h = torch.randn(64, 512, dtype=dt, requires_grad=True)
        W = torch.randn(32000, 512, dtype=dt, requires_grad=True)
        b = torch.randn(32000, dtype=dt, requires_grad=True)
        t, m = torch.randint(0, 32000, (64,)), torch.rand(64) < 0.5
        out.append((f"masked_linear_cross_entropy slab {dt}", lambda h=h, W=W, b=b, t=t, m=m:
                    slab(h, W, b, t, m)))  # fmt: skip
    from dlm.model import rope_cos_sin
    from dlm_kernels.ops import norm_rope

    for dt in (bf, f32):
        xs = [torch.randn(2, 37, d, dtype=dt) for d in (2048, 40)]
        ws = [torch.randn(d, dtype=dt) for d in (2048, 40)]
        qs = [torch.randn(2, 37, h, d, dtype=dt) for h, d in ((16, 128), (3, 40))]
        cs = [rope_cos_sin(torch.arange(37).expand(2, 37), d, 1e4) for d in (128, 40)]
        out.append((f"rms_norm / rope {dt}", lambda xs=xs, ws=ws, qs=qs, cs=cs: (
            [norm_rope.rms_norm(x, w, 1e-5) for x, w in zip(xs, ws)],
            [norm_rope.rope(q, *c) for q, c in zip(qs, cs)]),
        ))  # fmt: skip
    for dt, D in ((bf, 128), (bf, 40), (f16, 64), (bf, 256), (f32, 64)):
        B, S, Hq, Hk = 2, 256, 6, 2
        q = torch.randn(B, S, Hq, D, dtype=dt, requires_grad=True)
        k = torch.randn(B, S, Hk, D, dtype=dt, requires_grad=True)
        v = torch.randn(B, S, Hk, D, dtype=dt, requires_grad=True)
        am = torch.ones(B, S, dtype=torch.bool)
        am[0, :30] = False
        qs = torch.randn(B, 64, Hq, D, dtype=dt, requires_grad=True)
        cu = torch.tensor([0, 100, 256, 512], dtype=torch.int32)
        qv = torch.randn(512, Hq, D, dtype=dt, requires_grad=True)
        kv = torch.randn(512, Hk, D, dtype=dt, requires_grad=True)
        # Atomic dQ (deterministic=False) at the 16-bit head dims where wgmma is checked.
        atomic = D in (64, 128) and dt != f32
        out.append((f"bidirectional_attention {dt} D{D}", lambda q=q, k=k, v=v, am=am, qs=qs,
                    cu=cu, qv=qv, kv=kv, atomic=atomic: (
            att(q, k, v).sum().backward(),
            att(q, k, v, attention_mask=am, block_size=32, return_lse=True)[0].sum().backward(),
            att(q, k, v, attention_mask=am).sum().backward(),
            att(qs, k, v, attention_mask=am).sum().backward(),
            *((att(q, k, v, deterministic=False).sum().backward(),
               att(q, k, v, attention_mask=am, block_size=32,
                   deterministic=False).sum().backward()) if atomic else ()),
            att(qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=256,
                max_seqlen_k=256).sum().backward()),
        ))  # fmt: skip
    for dt in (bf, f32):
        lg = torch.randn(16, 151936, dtype=dt)
        rows = torch.arange(16)
        variants = [
            dict(),
            dict(temperature=0.7, top_p=0.95, seed=2**40),
            dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, confidence="margin"),
            dict(temperature=0.7, confidence="neg_entropy", seed=rows, offset=rows),
            dict(confidence="raw_prob", seed=3),
            dict(confidence="random", seed=3),
        ]
        out.append((f"sample_tokens {dt}", lambda lg=lg, variants=variants: [
            dk.sample_tokens(lg, **kw) for kw in variants]))  # fmt: skip
        x = torch.full((2, 37), 5)
        x[:, 10:] = 151935
        hid = torch.randn(2, 37, 512, dtype=dt)
        W = torch.randn(151936, 512, dtype=dt)
        out.append((f"fused_head_unmask_step {dt}", lambda x=x, hid=hid, W=W, dt=dt: (
            dk.fused_head_unmask_step(x, hid, W, mask_id=151935, num_transfer=3,
                                      temperature=0.7, top_p=0.9, seed=1),
            dk.fused_head_unmask_step(x, hid, W, bias=torch.zeros(151936, dtype=dt),
                                      mask_id=151935, num_transfer=3, seed=torch.tensor([1, 2]),
                                      offset=torch.tensor([0, 3]))),
        ))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    part, parts = 0, 1
    if argv[:1] == ["--part"]:  # "--part I/N": every N-th op call from the I-th (parallel runs)
        part, parts = (int(n) for n in argv[1].split("/"))
    _install()
    errors = []
    for name, thunk in _calls()[part::parts]:
        try:
            thunk()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:400]}")
    fails = [r for r in RESULTS.values() if r[0] == "FAIL"]
    for status, _, text in RESULTS.values():
        print(status, text)
    kernels = sorted({r[1] for r in RESULTS.values()})
    print(f"\n{len(RESULTS)} kernel variants, {len(fails)} failed to compile; kernels: "
          f"{' '.join(kernels)}")  # fmt: skip
    for e in errors:
        print("CALL FAILED", e)
    return 1 if fails or errors else 0


if __name__ == "__main__":
    sys.exit(main())
