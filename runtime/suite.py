"""The GPU acceptance suite: ``python -m runtime.bench --suite gpu [--out DIR] [--smoke]``.

Runs, in this order, and writes every result as soon as it has it (``DIR/suite.json`` and ``DIR/suite.md``, the
table to paste into docs/benchmarks.md):

1. the ``gpu``-marked tests (``pytest -m gpu``);
2. attention: every backend against the fp32 reference (bf16 tolerance) and its forward + backward speed at
   head dim 72 and 64, N = 256, 1024, 4096 (16 heads, 16k tokens per batch);
3. SiT-XL/2 bf16 training steps on synthetic latents for vanilla flow matching, Self-Flow and REPA (DINOv2-B/14
   with random weights on random images), eager and compiled (``train.compile``), at the largest batch up to
   256 that fits: step time, samples/s, TFLOP/s, MFU against :data:`PEAK_TFLOPS` and peak memory; on CUDA one
   more forward + backward under ``torch.cuda.set_sync_debug_mode("error")`` says whether it synchronised;
4. sampling throughput of the vanilla model: SDE 250 steps (batch 64) and Euler 50 steps;
5. ``train.parallel`` at one process: the vanilla eager step (batch 64) under ``ddp`` and ``fsdp2`` (a one-rank
   mesh), and their ratio.

``--smoke`` runs the same code at tiny sizes on CPU (SiT ``tiny`` on 64 px images, a tiny ViT, batch 2, fp32, a
few steps; compiled rows use the ``aot_eager`` backend, which traces forward and backward into one graph without
building C++ kernels), skips the pytest run and prints the same table, MFU column included (against the same
H100 peak, so tiny).
"""
from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

PEAK_TFLOPS = 989.0
"""H100 SXM dense bf16 tensor-core peak (TFLOP/s), the MFU denominator."""

SPECS = Path(__file__).resolve().parent.parent / "specs"
OBJECTIVE_SPECS = {"vanilla": "fm_imagenet256_xl2.json", "selfflow": "selfflow_imagenet256_xl2.json",
                   "repa": "repa_imagenet256_xl2.json"}


class Report:
    """Rows of results, rewritten to ``out/suite.json`` and ``out/suite.md`` after every row."""

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out, self.header, self.rows = out, header, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, **row: Any) -> None:
        self.rows.append({"section": section, **row})
        (self.out / "suite.json").write_text(json.dumps({**self.header, "rows": self.rows}, indent=1) + "\n")
        (self.out / "suite.md").write_text(self.markdown())
        print(f"[{section}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def markdown(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.header.items()]
        for section in dict.fromkeys(r["section"] for r in self.rows):
            rows = [r for r in self.rows if r["section"] == section]
            keys = list(dict.fromkeys(k for r in rows for k in r if k != "section"))
            lines += ["", f"### {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB on Linux)


def _timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ 1. tests
def gpu_tests(report: Report, smoke: bool) -> None:
    if smoke:
        report.add("gpu tests", result="not run (smoke: no CUDA here)")
        return
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                       cwd=SPECS.parent, capture_output=True, text=True)
    tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    report.add("gpu tests", result=tail, exit_code=r.returncode)


# -------------------------------------------------------------------------------------- 2. attention
def attention(report: Report, device: torch.device, smoke: bool) -> None:
    from zoo.layers.attention import (ATTENTION, MathAttentionParams, SDPAAttentionParams, attention_candidates)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cands = (attention_candidates(device.index or 0) if device.type == "cuda"
             else [SDPAAttentionParams(type="sdpa"), SDPAAttentionParams(type="sdpa", kernel="math")])
    ref = ATTENTION.build(MathAttentionParams(type="math"))
    heads, tokens = (4, 64) if smoke else (16, 16384)
    for head_dim in (72, 64):
        for n in ((16, 32) if smoke else (256, 1024, 4096)):
            b = max(1, tokens // n)
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(b, n, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
            want = ref(q, k, v).float()
            flops = 3.5 * 4 * b * heads * n * n * head_dim      # forward 4 B H N^2 Dh, backward 2.5 x forward
            for params in cands:
                attn = ATTENTION.build(params)
                name = attn.kernel_name(q)
                try:
                    err = float((attn(q, k, v).float() - want).abs().max())
                    x = q.detach().requires_grad_(True)
                    t = _timed(lambda: attn(x, k, v).sum().backward(), device, reps=3 if smoke else 10, warmup=1 if smoke else 3)
                except Exception as e:  # this kernel does not take these shapes
                    report.add("attention", head_dim=head_dim, N=n, batch=b, kernel=name, result=f"fails: {type(e).__name__}")
                    continue
                tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
                report.add("attention", head_dim=head_dim, N=n, batch=b, kernel=name, max_err=err,
                           equal=err <= tol, fwd_bwd_ms=t * 1e3, TFLOPs=flops / t / 1e12)


# ------------------------------------------------------------------------------------------ 3. steps
def _spec_sets(objective: str, smoke: bool, batch: int) -> list[str]:
    """``--set`` edits of the shipped XL/2 spec: bf16 (fp32 in smoke: AVX2 CPUs have no fast bf16 matmul)."""
    sets = [f"train.precision={'fp32' if smoke else 'bf16'}", f"train.batch_size={batch}", "train.grad_accum=1"]
    if objective == "selfflow":
        sets += ["objective.student_block=null", "objective.teacher_block=null"] if smoke else []
    if smoke:
        sets += ["backbone.preset=tiny", "train.device=cpu", "data.source.size=64"]       # 64 px: 16 tokens
        if objective == "repa":
            sets += ["teachers.dinov2.preset=tiny", "teachers.dinov2.image_size=28", "objective.align_depth=2"]
    return sets


def _largest_batch(build: Callable[[int], Any], step: Callable[[Any], None], device: torch.device,
                   batches: tuple[int, ...]) -> tuple[int, Any]:
    """The first batch size in ``batches`` (descending) whose training step runs without running out of memory."""
    for b in batches:
        run = None
        try:
            run = build(b)
            step(run)
            return b, run
        except (torch.OutOfMemoryError, RuntimeError) as e:  # compiled code may wrap the OOM in another error
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                raise
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError(f"no batch size in {batches} fits")


def training(report: Report, smoke: bool) -> dict[str, Any]:
    """Step rows per objective and mode; returns the vanilla graph (for sampling) and the step times."""
    from registry.spec import load_spec
    from runtime.bench_setup import prepare

    batches = (2,) if smoke else (256, 128, 64, 32)
    steps, warmup = (2, 1) if smoke else (10, 3)
    times: dict[str, float] = {}
    vanilla = None
    for objective, spec_file in OBJECTIVE_SPECS.items():
        for compiled in (False, True):
            def build(b: int) -> dict[str, Any]:
                # smoke: the TrainModule is compiled below with the aot_eager backend instead of inductor
                spec = load_spec(SPECS / spec_file, _spec_sets(objective, smoke, b)
                                 + [f"train.compile={'true' if compiled and not smoke else 'false'}"])
                run = prepare(spec_file, spec, synthetic=True)
                if compiled and smoke:
                    run["graph"].train_module.compile_step(backend="aot_eager")
                run["step"] = 0
                return run

            def one(run: dict[str, Any]) -> None:
                run["step"] += 1
                run["stepper"].step(run["step"], run["batches"])

            device = torch.device("cpu") if smoke else torch.device("cuda")
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            b, run = _largest_batch(build, one, device, batches)
            first = time.perf_counter() - t0                     # includes compilation for compiled runs
            t = _timed(lambda: one(run), device, reps=steps, warmup=warmup)
            g = run["graph"]
            flops = g.train_flops_per_sample() * b
            mode = "compiled" if compiled else "eager"
            times[f"{objective}/{mode}"] = t
            report.add("training step", objective=objective, mode=mode, batch=b, step_ms=t * 1e3,
                       samples_per_s=b / t, TFLOPs=flops / t / 1e12, MFU=flops / t / 1e12 / PEAK_TFLOPS,
                       first_step_s=first, peak_MiB=_peak_mib(device), kernel=g.attention_kernel,
                       host_sync=_sync_check(run) if device.type == "cuda" else "n/a (CPU)")
            if objective == "vanilla" and not compiled:
                vanilla = run
            else:
                del run
    for objective in ("selfflow", "repa"):
        for mode in ("eager", "compiled"):
            report.add("ratios", pair=f"{objective} / vanilla ({mode})",
                       step_time_ratio=times[f"{objective}/{mode}"] / times[f"vanilla/{mode}"])
    return {"vanilla": vanilla}


def _sync_check(run: dict[str, Any]) -> str:
    """One forward + backward of the step's loss (its draws made before, outside the check) with CUDA's sync
    debug mode set to error: "none", or the first synchronising call."""
    from zoo.core.types import StepRNG

    g, batch = run["graph"], run["batches"][0]
    tm, b = g.train_module, batch.x0.shape[0]
    ema = g.ema.module if g.ema is not None else None
    draws = tm.objective.draw(tm.backbone, batch, StepRNG(0, 0, 0, 0, b, b, g.device))
    loss = tm.compiled_loss if tm.compiled_loss is not None else tm._loss
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with g.autocast():
            out = loss(batch, draws, ema)
        out.loss.backward()
        return "none"
    except RuntimeError as e:
        return f"sync: {str(e).splitlines()[0][:80]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        run["stepper"].opt.zero_grad(set_to_none=True)


def parallel(report: Report, smoke: bool) -> None:
    """Vanilla eager step time of one process under ``train.parallel`` ddp (no wrapper at one rank) and fsdp2
    (a one-rank mesh: what sharding costs before any rank shares the work)."""
    from registry.spec import load_spec
    from runtime import distributed
    from runtime.bench_setup import prepare

    import torch.distributed as dist

    device = torch.device("cpu") if smoke else torch.device("cuda")
    own_group = not dist.is_initialized()
    distributed.init("cpu" if smoke else "cuda", group=True)
    batch, (steps, warmup) = (2, (2, 1)) if smoke else (64, (10, 3))
    times = {}
    for kind in ("ddp", "fsdp2"):
        spec = load_spec(SPECS / OBJECTIVE_SPECS["vanilla"], _spec_sets("vanilla", smoke, batch)
                         + [f'train.parallel={{"type": "{kind}"}}'])
        run = prepare(OBJECTIVE_SPECS["vanilla"], spec, synthetic=True)
        step = iter(range(1, 10**6))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times[kind] = _timed(lambda: run["stepper"].step(next(step), run["batches"]), device, reps=steps,
                             warmup=warmup)
        report.add("parallel (1 process)", parallel=kind, batch=batch, step_ms=times[kind] * 1e3,
                   samples_per_s=batch / times[kind], peak_MiB=_peak_mib(device))
        del run
    report.add("ratios", pair="fsdp2 / ddp (1 process, vanilla eager)", step_time_ratio=times["fsdp2"] / times["ddp"])
    if own_group:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- 4. sampling
def sampling(report: Report, run: dict[str, Any], smoke: bool) -> None:
    from registry.kinds import SOLVERS

    g = run["graph"]
    net = g.ema.module if g.ema is not None else g.backbone
    batch = 2 if smoke else 64
    solvers = {"sde": {"type": "euler_maruyama", "steps": 5 if smoke else 250, "last_step": 0.04},
               "euler": {"type": "euler", "steps": 3 if smoke else 50}}
    y = torch.zeros(batch, dtype=torch.long, device=g.device)

    @torch.no_grad()
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with g.autocast():
            return net(x, t, y).pred.float()

    for name, params in solvers.items():
        solver = SOLVERS.build(SOLVERS.get(params["type"]).Params.model_validate(params))
        noise = torch.randn(batch, g.num_tokens, g.modality.token_dim, device=g.device)
        gen = torch.Generator(device=g.device).manual_seed(0)
        t = _timed(lambda: solver.solve(velocity, noise, generator=gen), g.device, reps=1, warmup=1)
        flops = solver.nfe * net.flops(g.num_tokens) * batch
        report.add("sampling", solver=f"{name} {params['steps']} steps", batch=batch, seconds=t,
                   images_per_s=batch / t, TFLOPs=flops / t / 1e12, MFU=flops / t / 1e12 / PEAK_TFLOPS,
                   peak_MiB=_peak_mib(g.device))


# ------------------------------------------------------------------------------------------------ run
def run_suite(out: Path, smoke: bool) -> int:
    import zoo  # noqa: F401
    from registry.plugins import load_plugins

    load_plugins()
    if not smoke and not torch.cuda.is_available():
        sys.stderr.write("error: --suite gpu needs a CUDA device (use --smoke for the CPU check of the code)\n")
        return 2
    device = torch.device("cpu") if smoke else torch.device("cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    report = Report(out, {"device": name, "torch": torch.__version__, "smoke": smoke, "peak_TFLOPs": PEAK_TFLOPS,
                          "date": time.strftime("%Y-%m-%d")})
    t0 = time.perf_counter()
    gpu_tests(report, smoke)
    attention(report, device, smoke)
    runs = training(report, smoke)
    sampling(report, runs["vanilla"], smoke)
    parallel(report, smoke)
    report.add("total", seconds=time.perf_counter() - t0)
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
    return 0 if all(math.isfinite(r.get("step_ms", 0.0)) for r in report.rows) else 1
