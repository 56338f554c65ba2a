"""Shared plumbing for the GPU benchmarks: model loading, environment record, JSON output.

Every benchmark writes one JSON file under results/ holding the exact command, the device and
the library versions next to its numbers, so a committed result says how it was made.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def load_model(spec: str, random_weights: bool = False):
    """(model, tokenizer) of `spec` (`rlkv.load_model`); with `random_weights`, the model its config describes
    with freshly initialised weights, so a directory holding only config.json and the tokenizer will do.

    Speed and memory do not depend on the weights' values where every configuration generates the same
    number of tokens: this spares a GPU machine the model's transfer and conversion."""
    import rlkv

    if not random_weights:
        return rlkv.load_model(spec)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = rlkv.models.default_device()
    config = AutoConfig.from_pretrained(spec)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec)
    rlkv.models.configure_tokenizer(tokenizer, model)
    return model.eval(), tokenizer


def weights_arguments(parser) -> None:
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the model's config with random weights (speed and memory only; config and tokenizer suffice)",
    )


def host_cpu() -> str:
    """The host's CPU model and core count: eager (host-bound) rows depend on it as much as on the GPU."""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def environment() -> dict:
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device,
        "host": host_cpu(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def speedup_theory(sparsity: float, sink: int, recent: int, length: float) -> float:
    """Decode speedup if a step's time followed the K/V bytes it reads: 1 / ((1 - s) + s * (sink + recent) / L),
    L the mean sequence length (prompt + generation)."""
    return 1 / ((1 - sparsity) + sparsity * (sink + recent) / length)


def profiled(fn):
    """(`fn()`, torch.profiler's per-operator averages of it): host operators, and on CUDA the kernels too."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        result = fn()
    return result, prof.key_averages()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_seconds(fn, reps: int = 50) -> float:
    """Seconds one `fn()` keeps the device busy: on CUDA, `reps` calls captured in one CUDA graph and
    replayed (no launch overhead, as in the engine's graphed decode step); on CPU, a timed loop."""
    fn()  # compile / warm up
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return event_seconds(graph.replay, reps=1) / reps


def copy_bandwidth(device) -> float:
    """Bytes per second of a 256 MiB device-to-device copy, read and written (a decode step's floor divides by it)."""
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / gpu_seconds(lambda: dst.copy_(src), reps=20)


def event_seconds(fn, reps: int = 20) -> float:
    """Seconds per `fn()` between CUDA events, after one warm-up call (e.g. a captured graph's `replay`)."""
    fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / reps


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)
