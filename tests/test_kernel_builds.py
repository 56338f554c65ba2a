"""Every Triton kernel builds for an H100 (sm_90, down to cubin) on a CPU, as the GPU launches it.

The other tests run the kernels in Triton's interpreter at float32, which checks no types: FP8's store kernel ran
there and failed to compile on the GPU for bf16 activations (a runtime branch that changed a variable's type).
Here the real launchers run with the GPU's dtypes (bf16 activations, bf16 or FP8 stores) against recorders that
only note each launch; a process without the interpreter then compiles every launch with Triton's compiler."""

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlkv
from rlkv.engine.attention import Decode
from rlkv.engine.kv import KVStore
from rlkv.precision import FP8, KVPrecision, KVPrecisions

H100 = ("cuda", 90, 32)  # backend, compute capability, warp size
TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    FP8: "fp8e4nv",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for a kernel: `kernel[grid](...)` notes the launch (argument types, constants, options) in
    `launches` and runs nothing."""

    def __init__(self, module, name: str, launches: dict):
        self.module, self.name, self.launches = module.__name__, name, launches
        self.params = inspect.signature(getattr(module, name).fn).parameters

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            values = {**dict(zip(self.params, args)), **{k: v for k, v in kwargs.items() if k not in OPTIONS}}
            signature, constants = {}, {}
            for name, param in self.params.items():
                value = values[name]
                if "constexpr" in str(param.annotation) or value is None:
                    signature[name], constants[name] = "constexpr", value
                else:
                    signature[name] = argument_type(value)
            spec = {
                "module": self.module,
                "kernel": self.name,
                "signature": signature,
                "constants": constants,
                "options": {k: v for k, v in kwargs.items() if k in OPTIONS},
            }
            self.launches.setdefault(json.dumps(spec, sort_keys=True), spec)

        return launch


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument {value!r}")


def build(specs: list[dict]) -> list[str]:
    """Compile each launch for an H100 (run without TRITON_INTERPRET): the failures, as 'kernel: error'."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for spec in specs:
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        names = list(spec["signature"])
        source = ASTSource(
            fn=kernel,
            signature=spec["signature"],
            constexprs={(names.index(k),): v for k, v in spec["constants"].items()},
        )
        try:
            triton.compile(source, target=GPUTarget(*H100), options=spec["options"])
        except Exception as e:  # noqa: BLE001 - any failure to build is the finding
            failures.append(f"{spec['kernel']} {spec['constants']}: {type(e).__name__}: {str(e)[-800:]}")
    return failures


def launch_everything(head_dim: int) -> None:
    """The engine's kernels (store, decode, combine) at every KV dtype, gated or not, one split or several, the
    token droppers' slot kernel, observing or not, and sampling's threshold search: the model's activations in bf16
    as on the GPU."""
    from rlkv.attention.slot_kernel import slot_attention
    from rlkv.engine.kernel import decode_attention, store_kv
    from rlkv.engine.nucleus import nucleus_threshold_kernel

    bf16, gen = torch.bfloat16, torch.Generator().manual_seed(0)
    layout = rlkv.Layout("qwen2", 1, 12, 2, head_dim, "bfloat16", "x")  # Qwen2.5-1.5B's heads
    keep = torch.tensor([[True, False]])
    scales = torch.ones(2, *layout.shape)
    fp8, native = KVPrecision(FP8, scales), KVPrecision(bf16)
    slots, pos = torch.tensor([1, 2, 0]), torch.tensor([40, 7, 0])
    q, k, v = (torch.randn(3, h, head_dim, generator=gen).to(bf16) for h in (12, 2, 2))
    for kv_dtype, kept, ring in (("bf16", native, native), ("fp8", fp8, fp8), ("fp8-kept", native, fp8)):
        store = KVStore(layout, keep, 16, 64, 16, 2**24, 4, 1024, "cpu", KVPrecisions(kept, ring))
        store_kv(k, v, store, 0, Decode.of(store, slots, pos))
        gates = (None, torch.rand(2, generator=gen)) if kv_dtype == "bf16" else (None,)  # gated rollouts: bf16
        for alpha in gates:
            for splits in (1, 3):
                decode_attention(q, store, 0, slots, pos + 1, head_dim**-0.5, None, alpha, splits=splits)
        decode_attention(q, store, 0, slots, pos + 1, head_dim**-0.5, 4096)  # a sliding window
        keys, values = (torch.randn(4, 2, 80, head_dim, generator=gen).to(ring.dtype) for _ in range(2))
        places = torch.randint(0, 100, (4, 2, 80), generator=gen, dtype=torch.int32)
        for observe in (False, True):
            slot_attention(
                q, k, v, keys, values, places, slots, pos, head_dim**-0.5, None, observe,
                scales=(scales[0, 0], scales[1, 0]) if ring.quantized else None,
            )  # fmt: skip
    nucleus_threshold_kernel(torch.randn(3, 151_936), torch.tensor([0, 20, 500]), torch.tensor([0.95, 1.0, 0.5]))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_kernel_builds_for_an_h100(monkeypatch, tmp_path, head_dim):
    pytest.importorskip("triton")
    import rlkv.attention.slot_kernel
    import rlkv.engine.kernel
    import rlkv.engine.nucleus

    launches: dict[str, dict] = {}
    kernels = [(rlkv.engine.kernel, n) for n in ("_decode_kernel", "_combine_kernel", "_store_kernel")]
    kernels += [(rlkv.attention.slot_kernel, "_slot_decode_kernel")]
    kernels += [(rlkv.engine.nucleus, n) for n in ("_keys_kernel", "_pass_kernel", "_threshold_kernel")]
    for module, name in kernels:
        monkeypatch.setattr(module, name, Recorder(module, name, launches))
    launch_everything(head_dim)
    specs = list(launches.values())
    names = {"_decode_kernel", "_combine_kernel", "_store_kernel", "_slot_decode_kernel"}
    names |= {"_keys_kernel", "_pass_kernel", "_threshold_kernel"}
    assert {s["kernel"] for s in specs} == names
    assert {s["constants"]["NUCLEUS"] for s in specs if s["kernel"] == "_pass_kernel"} == {False, True}
    assert {s["constants"]["PAGE_FP8"] for s in specs if s["kernel"] == "_store_kernel"} == {False, True}
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)


if __name__ == "__main__":  # the build, in a process without Triton's interpreter
    print(json.dumps(build(json.loads(Path(sys.argv[1]).read_text()))))
