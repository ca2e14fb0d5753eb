"""Compile SpindleKV's Triton kernels for an H100/H200 (sm_90) on a machine with no GPU and print,
as JSON, each kernel's registers and spilled bytes (from ptxas -v, which ships with Triton):
what Triton's interpreter cannot check (types, layouts, register pressure). Run by
tests/test_codebook_triton.py in a process without TRITON_INTERPRET, with Llama-3-8B's head
shapes (head dim 128, 4 query heads per KV head) and bfloat16 storage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from methods.cache.spindlekv import codebook_triton_kernels as kernels

STORED, INT, FLAGS, FLOAT = "*bf16", "*i32", "*u8", "*fp32"
SLOTS = dict(
    q_ptr=FLOAT, kent_ptr=STORED, krefs_ptr=INT, kmag_ptr=STORED, table_ptr=STORED, pos_ptr=INT,
    heads_ptr=FLAGS, vent_ptr=STORED, vrefs_ptr=INT, vmag_ptr=STORED, m_ptr=FLOAT, l_ptr=FLOAT,
    acc_ptr=FLOAT, **dict.fromkeys(["H", "U", "G", "D", "DV", "per_split"], "i32"), softcap="fp32",
    **dict.fromkeys([f"s_{t}_{a}" for t in ("kr", "vr", "pos", "km", "vm") for a in "bh"], "i32"),
    s_hd_b="i32", s_hd_h="i32", s_hd_g="i32",
)  # fmt: skip
JOIN = dict(
    q_ptr=FLOAT, tk_ptr=STORED, tv_ptr=STORED, m_ptr=FLOAT, l_ptr=FLOAT, acc_ptr=FLOAT,
    out_ptr=FLOAT, **dict.fromkeys(["G", "D", "DV", "T", "S"], "i32"), softcap="fp32",
)  # fmt: skip
MATCH = dict(
    v_ptr=STORED, table_ptr=STORED, pos_ptr=INT, ent_ptr=STORED, owner_ptr=INT, best_ptr=FLOAT,
    ref_ptr=INT, keep_ptr=FLOAT, norm_ptr=FLOAT, count="i32", D="i32",
)  # fmt: skip
OPEN = dict(
    best_ptr=FLOAT, ref_ptr=INT, keep_ptr=FLOAT, ent_ptr=STORED, owner_ptr=INT, refs_ptr=INT,
    made_ptr=INT, N="i32", count="i32", D="i32", theta="fp32",
)  # fmt: skip
FLAGS_ON = dict(HAS_KMAG=True, HAS_VMAG=True, HAS_HEADS=True, SOFTCAP=True)
BUILDS = {
    "slots": (kernels.slots_kernel, SLOTS, dict(FLAGS_ON, G_P=16, D_P=128, DV_P=128, BLOCK_U=16)),
    "join": (kernels.join_kernel, JOIN, dict(SOFTCAP=True, G_P=16, D_P=128, DV_P=128, T_P=1)),
    "match": (kernels.match_kernel, MATCH, dict(HAS_TABLE=True, MAGNITUDES=True, HALF_P=64,
                                                BLOCK_E=32)),
    "open": (kernels.open_kernel, OPEN, dict(N_P=8, D_P=128)),
}  # fmt: skip


def ptxas_usage(ptx: str) -> dict[str, int]:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run(
            [str(ptxas), "-arch=sm_90a", "-v", str(source), "-o", str(Path(folder) / "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return {"registers": registers, "spilled_bytes": spills}


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    out = {}
    for name, (fn, signature, constants) in BUILDS.items():
        signature = dict(signature, **dict.fromkeys(constants, "constexpr"))
        compiled = triton.compile(ASTSource(fn, signature, constants), target=target)
        out[name] = ptxas_usage(compiled.asm["ptx"])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
