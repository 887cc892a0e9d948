"""sm_90 (H100) static instrument: what the GPU would launch, judged on a CPU.

No GPU is needed.  Triton picks its compile target from the *active driver*;
:func:`sm90_target` installs a stand-in driver whose target is
``GPUTarget('cuda', 90, 32)`` (``triton.runtime.driver.set_active``, restored
on exit) and makes every ``kernel[grid](...)`` launch a *warmup*: the real host
code runs its real launches through Triton's JIT, which specialises each one
exactly as on a GPU (integer arguments divisible by 16 / equal to 1, pointer
alignment, constexprs, num_warps / num_stages) and compiles it to a cubin in
``TRITON_CACHE_DIR``; nothing executes.  Tensors stay on the CPU.

* :func:`capture_launches` runs real host code under that driver (and a
  dispatch mode that skips the torch compute, :class:`SkipCompute`) and
  returns one :class:`Launch` per kernel launch, with its resources and H100
  occupancy.
* :func:`resources` reads a CompiledKernel's cubin: ptxas' own report
  (registers, spill stores/loads, stack frame), ``cuobjdump -res-usage``
  (static shared memory, local memory), Triton's dynamic shared memory, and
  the SASS (instruction count, HGMMA/HMMA, a dynamic per-program estimate).
* :func:`occupancy` applies the H100 limits in :data:`H100`.
* :func:`cuda_kernel_resources` compiles every ``csrc/**/*.cu`` for sm_90 with
  ``nvcc --resource-usage`` (every template instantiation it contains).

Kernels must be created with ``TRITON_INTERPRET=0``: in an interpreter process
(the tests) call :func:`run_in_subprocess` or run this module's users with that
environment.  The persistent cache is ``$CONVNEXTV2_FAST_SM90_CACHE``
(default ``~/.cache/convnextv2_fast/triton-sm90``); :func:`sm90_target` points
``TRITON_CACHE_DIR`` at it unless ``cache_dir=False``.

This is a static view, not a GPU measurement.
"""
import ast
import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ENV = 'CONVNEXTV2_FAST_SM90_CACHE'

# H100 SXM (sm_90) limits used by :func:`occupancy` (CUDA occupancy rules).
H100 = dict(
    name='H100 (sm_90)',
    sms=132,
    regs_per_sm=65536,
    reg_alloc_unit=256,  # registers are allocated per warp in units of 256
    max_regs_per_thread=255,
    max_regs_per_block=65536,
    smem_per_sm=228 * 1024,
    smem_max_per_block=227 * 1024,
    smem_reserved_per_block=1024,  # the driver reserves 1 KB per block
    max_warps_per_sm=64,
    max_blocks_per_sm=32,
    max_threads_per_block=1024,
    warp_size=32,
)


def cache_dir() -> str:
    """The persistent sm_90 Triton cache (created)."""
    d = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser('~'), '.cache', 'convnextv2_fast', 'triton-sm90')
    os.makedirs(d, exist_ok=True)
    return d


def _nvidia_bin(tool: str) -> Optional[str]:
    """Triton's bundled CUDA tool (ptxas, cuobjdump, nvdisasm) or PATH's."""
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), 'backends',
                         'nvidia', 'bin', tool)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which(tool)


def have_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


# --------------------------------------------------------------------------
# occupancy
# --------------------------------------------------------------------------
def occupancy(regs: int, smem: int, num_warps: int,
              programs: Optional[int] = None, limits: dict = H100) -> dict:
    """Resident programs (blocks) per SM on ``limits`` and what limits them.

    ``regs``: registers per thread; ``smem``: shared memory bytes per block
    (static + dynamic); ``num_warps``: warps per block.  Returns
    ``programs_per_sm``, ``occupancy`` (resident warps / 64), ``limiter``
    (``'regs' | 'smem' | 'warps' | 'blocks'``, or ``'does not fit'``),
    ``waves`` (programs / (programs_per_sm * SMs), when ``programs`` given).
    """
    L = limits
    threads = num_warps * L['warp_size']
    regs_warp = math.ceil(max(regs, 1) * L['warp_size'] /
                          L['reg_alloc_unit']) * L['reg_alloc_unit']
    fits = (regs <= L['max_regs_per_thread']
            and regs_warp * num_warps <= L['max_regs_per_block']
            and smem <= L['smem_max_per_block']
            and threads <= L['max_threads_per_block'])
    if not fits:
        return dict(programs_per_sm=0, occupancy=0.0, limiter='does not fit',
                    waves=None)
    # (ties go to the first: 'warps' or 'blocks' means full residency)
    by = dict(
        warps=L['max_warps_per_sm'] // num_warps,
        blocks=L['max_blocks_per_sm'],
        smem=L['smem_per_sm'] // (smem + L['smem_reserved_per_block']),
        regs=(L['regs_per_sm'] // regs_warp) // num_warps)
    n = min(by.values())
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    out = dict(programs_per_sm=n,
               occupancy=n * num_warps / L['max_warps_per_sm'],
               limiter=limiter, waves=None)
    if programs is not None and n > 0:
        out['waves'] = programs / (n * L['sms'])
    return out


# --------------------------------------------------------------------------
# ptxas report, cuobjdump, SASS
# --------------------------------------------------------------------------
_PTXAS_RE = dict(
    regs=re.compile(r'Used (\d+) registers'),
    stack_B=re.compile(r'(\d+) bytes stack frame'),
    spill_store_B=re.compile(r'(\d+) bytes spill stores'),
    spill_load_B=re.compile(r'(\d+) bytes spill loads'),
    smem_static_B=re.compile(r'(\d+) bytes smem'),
    barriers=re.compile(r'used (\d+) barriers'),
)


def parse_ptxas_log(log: str) -> Dict[str, dict]:
    """``ptxas -v`` output -> {function: {regs, stack_B, spill_store_B,
    spill_load_B, smem_static_B, barriers}} (one entry per entry function)."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or \
            re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = out.setdefault(m.group(1), dict(
                regs=0, stack_B=0, spill_store_B=0, spill_load_B=0,
                smem_static_B=0, barriers=0))
            continue
        if cur is None:
            continue
        for k, rx in _PTXAS_RE.items():
            mm = rx.search(line)
            if mm:
                cur[k] = int(mm.group(1))
    return out


def _info_path(cubin: bytes) -> str:
    d = os.path.join(cache_dir(), 'ptxas-info')
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, hashlib.sha256(cubin).hexdigest()[:32] + '.json')


def _ptxas_report(compiled) -> dict:
    """ptxas' own report for this kernel's cubin: from the log captured when
    it was compiled (:func:`sm90_target` records it), else by running
    ``ptxas -v`` again on the cached PTX with Triton's options."""
    cubin = compiled.asm['cubin']
    path = _info_path(cubin)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from triton.backends.nvidia.compiler import (get_ptxas,
                                                 sm_arch_from_capability)
    arch = sm_arch_from_capability(compiled.metadata.target.arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        with open(src, 'w') as f:
            f.write(compiled.asm['ptx'])
        fmad = [] if compiled.metadata.enable_fp_fusion else ['--fmad=false']
        proc = subprocess.run(
            [get_ptxas(90).path, '-lineinfo', *fmad, '-v',
             '--regAllocOptLevel=2', f'--gpu-name={arch}', src, '-o',
             os.path.join(tmp, 'k.o')], capture_output=True, text=True,
            check=True)
    info = _one_function(parse_ptxas_log(proc.stdout + proc.stderr),
                         compiled.metadata.name)
    with open(path, 'w') as f:
        json.dump(info, f)
    return info


def _one_function(report: Dict[str, dict], name: str) -> dict:
    if name in report:
        return report[name]
    if len(report) == 1:
        return next(iter(report.values()))
    raise KeyError(f'ptxas report has no function {name!r}: {list(report)}')


def _run_tool(tool: str, *args) -> str:
    exe = _nvidia_bin(tool)
    if exe is None:
        raise FileNotFoundError(f'{tool} not found (Triton bin or PATH)')
    return subprocess.run([exe, *args], capture_output=True, text=True,
                          check=True).stdout


def res_usage(cubin_path: str) -> Dict[str, dict]:
    """``cuobjdump -res-usage``: {function: {REG, STACK, SHARED, LOCAL}}."""
    out, cur = {}, None
    for line in _run_tool('cuobjdump', '-res-usage', cubin_path).splitlines():
        m = re.match(r'\s*Function (\S+):', line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is not None and 'REG:' in line:
            for k, v in re.findall(r'(\w+(?:\[\d+\])?):(\d+)', line):
                cur[k] = int(v)
    return out


@dataclasses.dataclass
class SassInstr:
    addr: int
    op: str  # opcode with modifiers, e.g. 'HGMMA.64x128x16.F32.BF16'
    text: str
    line: Optional[int]  # source line (from -lineinfo), if known: innermost
    file: Optional[str]
    # every source frame of the instruction, innermost first: the inlined
    # helper's line, then each call site out to the kernel's own line
    frames: tuple = ()


_FRAME = re.compile(r'//## File "([^"]+)", line (\d+)'
                    r'(?: inlined at "([^"]+)", line (\d+))?')


def disassemble(cubin_path: str) -> List[SassInstr]:
    """SASS of a cubin via ``nvdisasm -c -g -gi`` (with source lines and
    their inlining chains)."""
    txt = _run_tool('nvdisasm', '-c', '-g', '-gi', cubin_path)
    out, frames, fresh = [], [], True
    for raw in txt.splitlines():
        m = _FRAME.search(raw)
        if m:  # a block of these lines: innermost frame first
            if fresh:
                frames, fresh = [], False
            for f, ln in ((m.group(1), m.group(2)), (m.group(3), m.group(4))):
                if f and (f, int(ln)) not in frames:
                    frames.append((f, int(ln)))
            continue
        m = re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);', raw)
        if not m:
            continue
        fresh = True
        body = m.group(2).strip()
        body = re.sub(r'^@!?U?P\w+\s+', '', body)  # predicate guard
        op = body.split()[0] if body else ''
        file, line = frames[0] if frames else (None, None)
        out.append(SassInstr(int(m.group(1), 16), op, body, line, file,
                             tuple(frames)))
    return out


def _branch_target(ins: SassInstr, labels: Dict[str, int]) -> Optional[int]:
    if not ins.op.startswith(('BRA', 'JMP')):
        return None
    m = re.search(r'`\(([^)]+)\)', ins.text)
    if m and m.group(1) in labels:
        return labels[m.group(1)]
    m = re.search(r'\b0x([0-9a-f]+)\b', ins.text)
    return int(m.group(1), 16) if m else None


def _labels(cubin_path: str) -> Dict[str, int]:
    """label -> address (nvdisasm prints ``.L_x_N:`` before the target)."""
    txt = _run_tool('nvdisasm', '-c', cubin_path)
    labels, pending = {}, []
    for raw in txt.splitlines():
        m = re.match(r'\s*(\.L_\w+):', raw)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r'\s*/\*([0-9a-f]{4,})\*/', raw)
        if m and pending:
            for lab in pending:
                labels[lab] = int(m.group(1), 16)
            pending = []
    return labels


def sass_loops(instrs: List[SassInstr],
               labels: Dict[str, int]) -> List[dict]:
    """Loops as backward branches: [{start, end, frames}] (addresses; the
    source frames of each instruction of the loop's OWN body -- not inside
    a loop nested in it -- that has any)."""
    spans = []
    for ins in instrs:
        tgt = _branch_target(ins, labels)
        # (a branch to itself is the trailing ``BRA self`` after EXIT)
        if tgt is not None and tgt < ins.addr:
            spans.append((tgt, ins.addr))
    loops = []
    for a, b in spans:
        inner = [(c, d) for c, d in spans if a <= c and d <= b and
                 (c, d) != (a, b)]
        own = [i for i in instrs if a <= i.addr <= b and
               not any(c <= i.addr <= d for c, d in inner)]
        loops.append(dict(start=a, end=b,
                          frames=[i.frames for i in own if i.frames]))
    return loops


@functools.lru_cache(maxsize=None)
def _source_tree(file: str):
    try:
        with open(file) as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _source_range_loops(file: str) -> List[dict]:
    """``for ... in range(...)`` / ``tl.range(...)`` loops of a source file
    (static_range is unrolled by Triton and never becomes a SASS loop), each
    with the function that contains it."""
    tree = _source_tree(file)
    if tree is None:
        return []
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.For) and isinstance(node.iter, ast.Call):
                f = node.iter.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(
                    f, 'id', '')
                if name == 'range':
                    out.append(dict(first=node.lineno, last=node.end_lineno,
                                    args=node.iter.args, func=fn))
    return out


def _encloses(key, s, inner) -> bool:
    """Whether Python loop ``s`` (``key`` = (file, index)) strictly encloses
    the resolved loop ``inner`` = (its key, its loop, its source chain: a
    line in it, then the call sites outwards): it is another loop and
    contains that loop's lines, or it contains one of the call
    sites (the inner loop is in an inlined helper)."""
    ikey, isrc, chain = inner
    if key == ikey:
        return False
    if key[0] == ikey[0] and s['first'] <= isrc['first'] and \
            isrc['last'] <= s['last']:
        return True
    return any(f == key[0] and s['first'] <= line <= s['last']
               for f, line in chain[1:])


def _source_loop_of(loop: dict, inner=()):
    """The Python ``range`` loop a SASS loop runs, and the source frames
    from it outwards (its line, then each call site up to the kernel).
    Candidates are the loops that enclose at least half of the SASS loop's
    own instructions through ANY frame of their inlining chains (a helper's
    lines count for the loop around its call site); of those the innermost:
    hit through the shallowest frames (a loop inside an inlined helper is
    inside the caller's loop around the call), then the shortest.
    ``inner``: the resolved loops of the SASS loops nested in this one
    (``(key, loop, chain)``, resolved first); a candidate must strictly
    enclose each of them (:func:`_encloses`) -- a
    software-pipelined inner loop leaves its prologue (loads of its first
    stages) in the outer SASS loop's own body, which then looks like the
    inner Python loop.  Returns (loop, chain, key); Nones when there is
    none."""
    counts: Dict[tuple, int] = {}
    depth: Dict[tuple, int] = {}
    by_key, chain = {}, {}
    for frames in loop['frames']:
        hit = {}
        for d, (file, line) in enumerate(frames):
            for i, s in enumerate(_source_range_loops(file)):
                if s['first'] <= line <= s['last'] and (file, i) not in hit \
                        and all(_encloses((file, i), s, o) for o in inner):
                    hit[(file, i)] = d
                    by_key[(file, i)] = s
                    chain.setdefault((file, i), frames[d:])
        for k, d in hit.items():
            counts[k] = counts.get(k, 0) + 1
            depth[k] = depth.get(k, 0) + d
    if not counts:
        return None, None, None
    need = min(max(counts.values()), 0.5 * len(loop['frames']))
    k = min((k for k, v in counts.items() if v >= need),
            key=lambda k: (depth[k] / counts[k],
                           by_key[k]['last'] - by_key[k]['first']))
    return by_key[k], chain[k], k


def _function_at(file: str, line: int):
    """The innermost function definition of ``file`` containing ``line``."""
    tree = _source_tree(file)
    best = None
    for fn in ast.walk(tree) if tree is not None else ():
        if isinstance(fn, ast.FunctionDef) and \
                fn.lineno <= line <= fn.end_lineno and \
                (best is None or fn.lineno > best.lineno):
            best = fn
    return best


# what a loop bound may call: program ids are those of program 0 (the
# busiest program of a grid-stride or split loop: it runs the most trips)
_BOUND_CALLS = dict(program_id=lambda *a, **k: 0, cdiv=lambda a, b: -(-a // b),
                    minimum=min, maximum=max, min=min, max=max)
_BOUND_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
              ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b,
              ast.Mod: lambda a, b: a % b}


class _Unresolved(Exception):
    pass


def _eval_bound(node, ctx, args: Dict[str, object], depth=0):
    """Value of a loop-bound expression.  ``ctx``: [(function, line), ...]
    from the loop's function out to the kernel (the call sites of inlined
    helpers).  A name is its last plain assignment in the function before
    the line; else a helper's parameter is the call site's argument (in the
    caller's context); else, in the kernel, the launch argument of that
    name (scalars and constexprs).  ``tl.program_id`` is 0; a few integer
    helpers; anything loaded raises :class:`_Unresolved`."""
    if depth > 40 or not ctx:
        raise _Unresolved
    fn, before = ctx[0]
    ev = functools.partial(_eval_bound, ctx=ctx, args=args, depth=depth + 1)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int,
                                                                  float)):
        return node.value
    if isinstance(node, ast.Name):
        assigned = [a for a in ast.walk(fn) if isinstance(a, ast.Assign) and
                    a.lineno < before and len(a.targets) == 1 and
                    isinstance(a.targets[0], ast.Name) and
                    a.targets[0].id == node.id]
        if assigned:
            a = max(assigned, key=lambda a: a.lineno)
            return _eval_bound(a.value, [(fn, a.lineno)] + ctx[1:], args,
                               depth + 1)
        params = [p.arg for p in fn.args.args]
        if node.id in params and len(ctx) > 1:  # a helper's parameter
            caller, line = ctx[1]
            calls = [c for c in ast.walk(caller) if isinstance(c, ast.Call)
                     and c.lineno <= line <= c.end_lineno and
                     getattr(c.func, 'id', getattr(c.func, 'attr', None))
                     == fn.name]
            if len(calls) != 1:
                raise _Unresolved
            call = calls[0]
            kw = {k.arg: k.value for k in call.keywords}
            i = params.index(node.id)
            arg = kw.get(node.id, call.args[i] if i < len(call.args)
                         else None)
            if arg is None:
                raise _Unresolved
            return _eval_bound(arg, ctx[1:], args, depth + 1)
        if len(ctx) == 1 and node.id in args:
            return args[node.id]
        raise _Unresolved
    if isinstance(node, ast.BinOp) and type(node.op) in _BOUND_OPS:
        return _BOUND_OPS[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', '')
        if name not in _BOUND_CALLS:
            raise _Unresolved
        return _BOUND_CALLS[name](*[ev(a) for a in node.args])
    raise _Unresolved


def _trip_count(loop: dict, args: Dict[str, object], inner=()):
    """``(trip count, resolved loop)`` of a SASS loop: its Python ``range``
    loop (:func:`_source_loop_of`, strictly enclosing ``inner``), the bounds
    evaluated by :func:`_eval_bound` with the launch's argument values.  The
    count is None when no loop is found or a bound depends on loaded data;
    the resolved loop ``(key, loop, chain)`` is None when none is found."""
    src, chain, key = _source_loop_of(loop, inner)
    if src is None:
        return None, None
    found = (key, src, chain)
    ctx = [(src['func'], src['first'])]
    for file, line in chain[1:]:  # call sites, outwards
        fn = _function_at(file, line)
        if fn is None:
            break
        ctx.append((fn, line))
    try:
        vals = [_eval_bound(a, ctx, args or {}) for a in src['args']]
        return len(range(*[int(v) for v in vals])), found
    except (_Unresolved, TypeError, ValueError, ZeroDivisionError):
        return None, found


def sass_summary(cubin: bytes, args: Optional[Dict[str, object]] = None
                 ) -> dict:
    """Instruction counts of a cubin's SASS.

    ``sass_instr``: static instruction count (NOPs excluded).
    ``sass_instr_per_program``: DYNAMIC estimate per program (CTA) = the
    straight-line count plus, for each loop (a backward branch in the SASS),
    its body x (trip count - 1), nested loops multiplying.  Trip counts come
    from the Python source: the ``range(...)`` loop that the SASS loop body's
    source frames (-lineinfo with inlining chains) fall in, evaluated with
    this launch's argument values (``args``), the kernel's local
    assignments and program 0's ids (the busiest program of a grid-stride or
    split loop: the busiest SM is what the model charges).  Approximate:
    both sides of every branch are counted (masked tails, predicated code);
    a loop whose bound depends on loaded data counts once
    (``loops_unresolved``; the static gate requires none); a loop that
    ptxas unrolled (several source iterations per SASS trip) is
    over-counted by the unroll factor.  Counts are per warp: multiply by the warps
    per program for the instructions an SM issues per program.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'k.cubin')
        with open(path, 'wb') as f:
            f.write(cubin)
        instrs = [i for i in disassemble(path) if i.op != 'NOP']
        labels = _labels(path)
    ops = [i.op for i in instrs]
    tc = ('HGMMA' if any(o.startswith('HGMMA') for o in ops) else
          'HMMA' if any(o.startswith('HMMA') for o in ops) else 'none')
    loops = sass_loops(instrs, labels)
    weight = {i.addr: 1 for i in instrs}
    unresolved, trips = 0, []
    # innermost first: an outer loop's Python loop must enclose those of
    # the loops nested in it
    found = {}
    for lp in sorted(loops, key=lambda lp: lp['end'] - lp['start']):
        inner = [found[id(o)] for o in loops if o is not lp and
                 lp['start'] <= o['start'] and o['end'] <= lp['end'] and
                 found.get(id(o)) is not None]
        t, found[id(lp)] = _trip_count(lp, args or {}, inner)
        lp['trips'] = t
    for lp in loops:
        t = lp.pop('trips')
        trips.append(t)
        if t is None:
            unresolved += 1
            continue
        for i in instrs:
            if lp['start'] <= i.addr <= lp['end']:
                weight[i.addr] *= max(t, 1)
    return dict(sass_instr=len(instrs),
                sass_instr_per_program=sum(weight.values()),
                tensor_core=tc, loops=len(loops), loop_trips=trips,
                loops_unresolved=unresolved,
                local_st=sum(o.startswith('STL') for o in ops),
                local_ld=sum(o.startswith('LDL') for o in ops))


_RESOURCES: Dict[tuple, dict] = {}
# bump when :func:`sass_summary` counts differently (its on-disk cache key)
_SASS_SUMMARY_VERSION = 7


def resources(compiled, args: Optional[Dict[str, object]] = None) -> dict:
    """Resources of a Triton CompiledKernel's sm_90 cubin.

    ``regs`` (per thread), ``spill_store_B`` / ``spill_load_B`` / ``stack_B``
    (ptxas' report), ``local_B`` (cuobjdump LOCAL), ``smem_B`` = static
    (cuobjdump SHARED) + Triton's dynamic ``metadata.shared``, plus
    :func:`sass_summary` (``args``: the launch's argument values, for loop
    trip counts).
    """
    cubin = compiled.asm['cubin']
    key = (hashlib.sha256(cubin).hexdigest(),
           tuple(sorted((args or {}).items())))
    if key in _RESOURCES:
        return dict(_RESOURCES[key])
    info = _ptxas_report(compiled)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'k.cubin')
        with open(path, 'wb') as f:
            f.write(cubin)
        ru = _one_function(res_usage(path), compiled.metadata.name)
    out = dict(regs=ru.get('REG', info['regs']),
               spill_store_B=info['spill_store_B'],
               spill_load_B=info['spill_load_B'], stack_B=info['stack_B'],
               # ptxas' static smem: cuobjdump's SHARED adds the 1 KB that
               # sm_90 reserves per block (counted by occupancy())
               local_B=ru.get('LOCAL', 0), smem_static_B=info['smem_static_B'],
               smem_dynamic_B=int(compiled.metadata.shared),
               barriers=info.get('barriers', 0))
    out['smem_B'] = out['smem_static_B'] + out['smem_dynamic_B']
    # the SASS summary is the slow part (nvdisasm): kept beside the cache
    side = _info_path(cubin)[:-5] + '-sass-' + hashlib.sha256(
        repr((_SASS_SUMMARY_VERSION, key[1])).encode()).hexdigest()[:16] + \
        '.json'
    if os.path.exists(side):
        with open(side) as f:
            summary = json.load(f)
    else:
        summary = sass_summary(cubin, args)
        with open(side, 'w') as f:
            json.dump(summary, f)
    out.update(summary)
    _RESOURCES[key] = out
    return dict(out)


# --------------------------------------------------------------------------
# the stand-in driver
# --------------------------------------------------------------------------
class _StandInDriver:
    """What Triton's JIT asks of a driver, answering for an sm_90 GPU."""

    def __init__(self, arch: int = 90, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget('cuda', arch, warp_size)

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return (self.target.arch // 10, self.target.arch % 10)

    def get_active_torch_device(self):
        import torch
        return torch.device('cpu')

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)


_LAUNCH_HOOK: List[Optional[Callable]] = [None]


@contextlib.contextmanager
def sm90_target(cache: Optional[object] = None):
    """Within: Triton compiles for sm_90 and launches become warmups.

    ``cache``: a Triton cache folder, ``None`` for :func:`cache_dir`, or
    ``False`` to keep the current ``TRITON_CACHE_DIR``.  ptxas' ``-v`` report
    of every kernel compiled inside is recorded beside the cache (keyed by
    the cubin's hash) for :func:`resources`.
    """
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        raise RuntimeError('sm90_target needs TRITON_INTERPRET=0 when the '
                           'kernels are created (use run_in_subprocess)')
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction

    saved_active = _driver._active
    saved_cache_env = os.environ.get('TRITON_CACHE_DIR')
    saved_cache_knob = knobs.cache.dir
    if cache is not False:
        d = cache_dir() if cache is None else str(cache)
        os.environ['TRITON_CACHE_DIR'] = d
        knobs.cache.dir = d
    orig_run = JITFunction.run
    orig_cubin = CUDABackend.make_cubin
    orig_dump = knobs.nvidia.dump_ptxas_log

    def make_cubin(self, src, metadata, opt, capability):
        import io
        buf = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(buf):
                cubin = orig_cubin(self, src, metadata, opt, capability)
        finally:
            knobs.nvidia.dump_ptxas_log = orig_dump
        rep = parse_ptxas_log(buf.getvalue())
        try:
            info = _one_function(rep, metadata.get('name', ''))
        except KeyError:
            info = None
        if info is not None:
            with open(_info_path(cubin), 'w') as f:
                json.dump(info, f)
        return cubin

    def run(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        dt = time.perf_counter() - t0
        hook = _LAUNCH_HOOK[0]
        if hook is not None and not warmup:
            hook(self, args, kwargs, grid, kernel, dt)
        return kernel

    _driver.set_active(_StandInDriver())
    JITFunction.run = run
    CUDABackend.make_cubin = make_cubin
    try:
        yield
    finally:
        JITFunction.run = orig_run
        CUDABackend.make_cubin = orig_cubin
        _driver._active = saved_active
        if cache is not False:
            knobs.cache.dir = saved_cache_knob
            if saved_cache_env is None:
                os.environ.pop('TRITON_CACHE_DIR', None)
            else:
                os.environ['TRITON_CACHE_DIR'] = saved_cache_env


# --------------------------------------------------------------------------
# skipping the torch compute
# --------------------------------------------------------------------------
def _make_skip_compute():
    import torch
    from torch.utils._pytree import tree_map
    from torch.utils._python_dispatch import TorchDispatchMode

    class SkipCompute(TorchDispatchMode):
        """Run torch ops for their shapes only: an op whose tensor inputs are
        all small (< ``small`` elements), a view or a factory runs for real;
        any other op is shape-inferred on the meta device and returns
        uninitialised CPU tensors of the right shape/dtype/strides (an
        in-place or ``out=`` op returns its mutated argument untouched).
        Values of big tensors are therefore garbage: host code must not
        branch on them.  ``ops`` counts the skipped ops by name."""

        def __init__(self, small: int = 1 << 16):
            super().__init__()
            self.small = small
            self.ops: Dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor)]
            if (not flat or func.is_view
                    or all(t.numel() < self.small for t in flat)
                    or not all(t.device.type == 'cpu' for t in flat)):
                return func(*args, **kwargs)
            schema = func._schema
            outs_alias = [r.alias_info for r in schema.returns]
            if any(a is not None for a in outs_alias):
                # in-place / out=: return the argument each output aliases
                named = {}
                for i, a in enumerate(schema.arguments):
                    if a.alias_info is not None:
                        v = (args[i] if i < len(args) and not a.kwarg_only
                             else kwargs.get(a.name))
                        named[tuple(sorted(a.alias_info.before_set))] = v
                res = [named.get(tuple(sorted(r.before_set))) if r else None
                       for r in outs_alias]
                if all(r is not None for r in res):
                    self.ops[str(func)] = self.ops.get(str(func), 0) + 1
                    return res[0] if len(res) == 1 else tuple(res)
                return func(*args, **kwargs)

            def to_meta(t):
                if isinstance(t, torch.Tensor):
                    return torch.empty_strided(t.shape, t.stride(),
                                               dtype=t.dtype, device='meta')
                return t

            try:
                meta = func(*tree_map(to_meta, args), **tree_map(to_meta,
                                                                  kwargs))
            except Exception:
                return func(*args, **kwargs)
            self.ops[str(func)] = self.ops.get(str(func), 0) + 1

            def to_cpu(t):
                if isinstance(t, torch.Tensor) and t.device.type == 'meta':
                    return torch.empty_strided(t.shape, t.stride(),
                                               dtype=t.dtype, device='cpu')
                return t

            return tree_map(to_cpu, meta)

    return SkipCompute


@functools.lru_cache(None)
def _skip_compute_cls():
    return _make_skip_compute()


def SkipCompute(*a, **k):  # noqa: N802 (a class made lazily: torch import)
    return _skip_compute_cls()(*a, **k)


# --------------------------------------------------------------------------
# capturing launches
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One kernel launch as the sm_90 JIT specialised and compiled it."""
    kernel: str
    grid: tuple
    programs: int
    num_warps: int
    num_stages: int
    constexprs: dict
    signature: dict  # param -> Triton type + specialisation, e.g. '*bf16:D'
    args: dict  # scalar (int/float/bool) argument values by name
    compiled: object  # triton CompiledKernel
    compile_s: float  # JIT time of this launch (compile or cache load)
    resources: dict
    occupancy: dict

    def row(self) -> dict:
        """Flat dict (no CompiledKernel) for results / JSON."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ('compiled', 'resources', 'occupancy')}
        d['grid'] = list(self.grid)
        d.update(self.resources)
        d.update(self.occupancy)
        return d


def _spec_str(spec) -> str:
    ty = spec[0]
    attr = spec[1] if len(spec) > 1 else None
    return f'{ty}:{attr}' if attr else str(ty)


def capture_launches(fn: Callable[[], object], skip_compute: bool = True,
                     cache: Optional[object] = None) -> List[Launch]:
    """Run ``fn()`` (real host code, CPU tensors) with Triton targeting sm_90
    and return one :class:`Launch` per kernel launch, in launch order.

    ``skip_compute``: run torch ops under :class:`SkipCompute` so real-size
    host code costs seconds (plus the compiles).
    """
    import torch
    from triton import knobs
    from triton.runtime import driver as _driver

    launches: List[Launch] = []

    def hook(jit, args, kwargs, grid, kernel, dt):
        kw = dict(kwargs)
        kw['debug'] = kw.get('debug', jit.debug) or knobs.runtime.debug
        if hasattr(knobs.compilation, 'instrumentation_mode'):
            kw['instrumentation_mode'] = knobs.compilation.instrumentation_mode
        binder = jit.device_caches[_driver.active.get_current_device()][4]
        bound, spec, options = binder(*args, **kw)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid)
        names = list(bound)
        constexprs = {n: s[1] for n, s in zip(names, spec)
                      if s[0] == 'constexpr'}
        signature = {n: _spec_str(s) for n, s in zip(names, spec)
                     if s[0] != 'constexpr'}
        scalars = {n: v for n, v in bound.items()
                   if isinstance(v, (int, float, bool))}
        md = kernel.metadata
        res = resources(kernel, scalars)
        programs = math.prod(grid)
        occ = occupancy(res['regs'], res['smem_B'], md.num_warps, programs)
        launches.append(Launch(
            kernel=md.name, grid=grid, programs=programs,
            num_warps=md.num_warps, num_stages=md.num_stages,
            constexprs=constexprs, signature=signature, args=scalars,
            compiled=kernel, compile_s=dt, resources=res, occupancy=occ))

    mode = SkipCompute() if skip_compute else contextlib.nullcontext()
    with sm90_target(cache):
        _LAUNCH_HOOK[0] = hook
        try:
            with mode, torch.no_grad():
                fn()
        finally:
            _LAUNCH_HOOK[0] = None
    return launches


# --------------------------------------------------------------------------
# gates
# --------------------------------------------------------------------------
def gate_failures(rows: List[dict], limits: dict = H100) -> List[str]:
    """Why each row (a :class:`Launch` row or a static-suite row) breaks the
    sm_90 resource gate: spill bytes, registers > 255 or > 64K per block,
    shared memory over the per-block maximum, a config that cannot be
    resident, a SASS loop whose trip count the instrument could not resolve
    (:func:`sass_summary`).  Empty list = pass."""
    bad = []
    for r in rows:
        ctx = ' '.join(str(r[k]) for k in ('shape', 'provider', 'phase',
                                            'config') if r.get(k))
        where = f"{r.get('kernel')}" + (f' [{ctx}]' if ctx else '')
        why = []
        if r.get('spill_store_B') or r.get('spill_load_B'):
            why.append(f"spills {r.get('spill_store_B')} B stores / "
                       f"{r.get('spill_load_B')} B loads per thread "
                       f"(stack {r.get('stack_B')} B)")
        regs, warps = r.get('regs') or 0, r.get('num_warps') or 1
        if r.get('num_warps') is None:
            why.append('threads per block unknown (launch site and '
                       '__launch_bounds__ not evaluable): occupancy and the '
                       'per-block register check cannot be made')
        if regs > limits['max_regs_per_thread']:
            why.append(f'{regs} registers/thread > '
                       f"{limits['max_regs_per_thread']}")
        unit = limits['reg_alloc_unit']
        per_block = math.ceil(regs * limits['warp_size'] / unit) * unit * warps
        if per_block > limits['max_regs_per_block']:
            why.append(f'{per_block} registers/block > '
                       f"{limits['max_regs_per_block']}")
        if (r.get('smem_B') or 0) > limits['smem_max_per_block']:
            why.append(f"{r.get('smem_B')} B shared memory > "
                       f"{limits['smem_max_per_block']}")
        if r.get('programs_per_sm') == 0:
            why.append(f"not resident on an SM ({r.get('limiter')})")
        if r.get('loops_unresolved'):
            why.append(f"{r['loops_unresolved']} loop(s) with no trip count "
                       '(counted once: the instruction estimate the model '
                       'charges would be too low)')
        if why:
            bad.append(f'{where}: ' + '; '.join(why))
    return bad


# --------------------------------------------------------------------------
# .cu kernels
# --------------------------------------------------------------------------
def _cu_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(ROOT, 'csrc', '**', '*.cu'),
                            recursive=True))


def _nvcc_cmd(src: str, out: str) -> List[str]:
    """nvcc for one .cu -> sm_90 cubin with setup.py's flags and the include
    folders of tools/cuda_build_env.py (see BUILD.md)."""
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    try:
        import cuda_build_env
    finally:
        sys.path.pop(0)
    from torch.utils import cpp_extension as ce
    env_inc = cuda_build_env.apply(os.environ)
    home = os.environ.get('CUDA_HOME')
    nvcc = (os.path.join(home, 'bin', 'nvcc') if home and os.path.exists(
        os.path.join(home, 'bin', 'nvcc')) else shutil.which('nvcc'))
    if nvcc is None:
        raise FileNotFoundError('nvcc not found')
    import torch
    incs = ce.include_paths() + env_inc + [os.path.join(ROOT, 'csrc')]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [nvcc, '-cubin', '-arch=sm_90', '-O3', '-std=c++20',
            '--expt-relaxed-constexpr', '-lineinfo', '--resource-usage',
            '-DWITH_CUDA', f'-D_GLIBCXX_USE_CXX11_ABI={abi}',
            *[f'-I{i}' for i in incs], src, '-o', out]


def _demangle(names: List[str]) -> Dict[str, str]:
    exe = shutil.which('c++filt') or _nvidia_bin('cu++filt')
    if not exe or not names:
        return {n: n for n in names}
    out = subprocess.run([exe], input='\n'.join(names), capture_output=True,
                         text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {
        n: n for n in names}


def _cu_consts(src_text: str) -> Dict[str, int]:
    return {k: int(v) for k, v in re.findall(
        r'constexpr\s+int(?:64_t)?\s+(\w+)\s*=\s*(\d+)\s*;', src_text)}


def _cu_expr(expr: str) -> str:
    """A C++ integer expression as Python (``/`` -> ``//``, std::max)."""
    expr = re.sub(r'std::(max|min)\s*<[^>]*>', r'\1', expr)
    expr = re.sub(r'std::(max|min)', r'\1', expr)
    return expr.replace('/', '//')


def eval_cu_grid(grid: dict, values: Dict[str, int]) -> Optional[int]:
    """Programs of a .cu launch grid (:func:`_cu_launch_sites`) given the
    runtime sizes (M, C, H, W); None when the grid is not evaluable."""
    ns = dict(grid['consts'], max=max, min=min, **values)
    names = dict(grid['locals'])
    try:
        for k, e in names.items():  # locals the grid uses (e.g. chunks)
            ns[k] = eval(_cu_expr(e), {'__builtins__': {}}, ns)
        return math.prod(int(eval(_cu_expr(e), {'__builtins__': {}}, ns))
                         for e in grid['dims'])
    except Exception:
        return None


def _split_args(s: str) -> List[str]:
    out, depth, cur = [], 0, ''
    for ch in s:
        if ch == ',' and depth == 0:
            out.append(cur.strip())
            cur = ''
            continue
        depth += ch in '(<'
        depth -= ch in ')>'
        cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def _cu_launch_sites(src_text: str, extra_consts: Optional[dict] = None
                     ) -> Dict[str, dict]:
    """Each ``kernel<<<grid, block, ...>>>`` of a .cu source: threads per
    block and the grid expression, resolved from their ``dim3 x(...)`` /
    ``int x = ...`` definitions and the file's ``constexpr int`` constants
    (read from the source, not restated)."""
    consts = dict(extra_consts or {}, **_cu_consts(src_text))
    out = {}
    for m in re.finditer(r'(\w+)\s*(?:<[^<>]*>)?\s*<<<(.*?)>>>', src_text,
                         re.S):
        name = m.group(1)
        launch = _split_args(m.group(2))
        if len(launch) < 2:
            continue
        before = src_text[:m.start()]

        def definition(tok):
            tok = tok.strip()
            d = list(re.finditer(rf'dim3\s+{re.escape(tok)}\s*\((.*?)\);',
                                 before, re.S))
            if d:
                return _split_args(d[-1].group(1))
            i = list(re.finditer(
                rf'(?:int|int64_t|auto)\s+{re.escape(tok)}\s*=\s*([^;]+);',
                before))
            return [i[-1].group(1)] if i else [tok]

        blk = definition(launch[1])
        grid = definition(launch[0])
        local = {}
        for e in grid:
            for tok in re.findall(r'[A-Za-z_]\w*', e):
                if tok in consts or tok in ('M', 'C', 'H', 'W', 'std', 'max',
                                            'min', 'int64_t'):
                    continue
                d = definition(tok)
                if d != [tok]:
                    local[tok] = d[0]
        try:
            threads = math.prod(int(eval(_cu_expr(e), {'__builtins__': {}},
                                         consts)) for e in blk)
        except Exception:
            threads = None
        out[name] = dict(threads=threads,
                         grid=dict(dims=grid, consts=consts, locals=local))
    return out


def _cu_launch_bounds(src_text: str, kernel: str,
                      consts: Dict[str, int]) -> Optional[int]:
    """Max threads of ``__launch_bounds__(T[, ...])`` on ``kernel``: what
    ptxas allocated registers for, when the launch site is not evaluable."""
    m = re.search(r'__launch_bounds__\s*\(([^,)]+)[^)]*\)\s*'
                  + re.escape(kernel) + r'\s*\(', src_text)
    if not m:
        return None
    try:
        return int(eval(_cu_expr(m.group(1)), {'__builtins__': {}}, consts))
    except Exception:
        return None


def cuda_kernel_resources(sources: Optional[List[str]] = None) -> List[dict]:
    """Every ``__global__`` kernel (every instantiation) of ``csrc/**/*.cu``
    compiled for sm_90: rows with ``kernel`` (demangled), ``file``, ``regs``,
    ``spill_store_B``, ``spill_load_B``, ``stack_B``, ``smem_B``,
    ``threads_per_block`` (from the launch site), occupancy, SASS summary,
    ``compile_s``.  The cubins are cached by source hash in the sm_90 cache
    folder; ``compile_s`` is 0 on a cache hit."""
    rows = []
    for src in sources or _cu_sources():
        with open(src) as f:
            text = f.read()
        hdrs = sorted(glob.glob(os.path.join(os.path.dirname(src), '*.h')))
        h = hashlib.sha256(text.encode())
        for p in hdrs:
            with open(p, 'rb') as f:
                h.update(f.read())
        d = os.path.join(cache_dir(), 'cu', h.hexdigest()[:24])
        cubin_p, log_p = os.path.join(d, 'k.cubin'), os.path.join(d, 'log')
        t = 0.0
        if not os.path.exists(log_p):
            os.makedirs(d, exist_ok=True)
            t0 = time.perf_counter()
            proc = subprocess.run(_nvcc_cmd(src, cubin_p),
                                  capture_output=True, text=True)
            t = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f'nvcc failed on {src}:\n'
                                   f'{proc.stderr[-3000:]}')
            with open(log_p, 'w') as f:
                f.write(proc.stdout + proc.stderr)
        with open(log_p) as f:
            rep = parse_ptxas_log(f.read())
        names = _demangle(list(rep))
        hdr_text = ''
        for p in hdrs:
            with open(p) as f:
                hdr_text += f.read() + '\n'
        sites = _cu_launch_sites(text, _cu_consts(hdr_text))
        for mangled, info in rep.items():
            pretty = names[mangled].replace('(anonymous namespace)::', '')
            head = pretty.split('(')[0]
            base = head.split('<')[0].rsplit('::', 1)[-1]
            kname = base + head[len(head.split('<')[0]):]
            site = sites.get(base, {})
            threads, threads_from = site.get('threads'), 'launch site'
            if threads is None:  # e.g. dim3(l.bx, l.by) from a helper
                threads = _cu_launch_bounds(text, base,
                                            dict(_cu_consts(hdr_text),
                                                 **_cu_consts(text)))
                threads_from = '__launch_bounds__ (upper bound)'
            smem = info['smem_static_B']  # cuobjdump's SHARED adds 1 KB
            occ = (occupancy(info['regs'], smem, max(1, threads // 32))
                   if threads else dict(programs_per_sm=None, occupancy=None,
                                        limiter=None, waves=None))
            row = dict(kernel=kname,
                       file=os.path.relpath(src, ROOT), regs=info['regs'],
                       spill_store_B=info['spill_store_B'],
                       spill_load_B=info['spill_load_B'],
                       stack_B=info['stack_B'], smem_B=smem,
                       threads_per_block=threads, threads_from=threads_from,
                       num_warps=max(1, threads // 32) if threads else None,
                       compile_s=t, grid_expr=site.get('grid'))
            row.update(occ)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------
# subprocess entry (interpreter processes call the instrument through it)
# --------------------------------------------------------------------------
def run_in_subprocess(module: str, *argv: str, timeout: int = 3600
                      ) -> subprocess.CompletedProcess:
    """``python -m <module> <argv>`` with ``TRITON_INTERPRET=0`` and this
    checkout first on ``PYTHONPATH``."""
    env = dict(os.environ, TRITON_INTERPRET='0',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run([sys.executable, '-m', module, *argv], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def describe_limits(limits: dict = H100) -> str:
    return ', '.join(f'{k}={v}' for k, v in limits.items())


__all__ = ['H100', 'Launch', 'SkipCompute', 'capture_launches', 'cache_dir',
           'cuda_kernel_resources', 'describe_limits', 'gate_failures',
           'have_ptxas', 'occupancy', 'resources', 'run_in_subprocess',
           'sass_summary', 'sm90_target']
