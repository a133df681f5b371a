"""Forward+backward time and memory of one MSLR layer against a PEFT LoRA layer of the same total rank.

Both adapters wrap the same frozen `nn.Linear(hidden, hidden)`: MSLR with B scales of rank r each, LoRA with rank
B*r, so both train B*r*(2*hidden) parameters. The input (batch*seq rows) requires grad, as it does inside a network,
so the backward also computes the input gradient through the base weight.

Time: median over `--repeats` timed iterations of forward + backward, after `--warmup` untimed ones. The two layers
are timed alternately (LoRA, MSLR, LoRA, ...) so that load from other processes hits both alike.

A second timing ("adapter only") runs the same two layers with the base layer swapped for a stub that returns zeros
of the right shape: the base matmul is >95% of a step and identical for both, so this column shows the adapters'
own cost, which the full-step ratio hides in noise on a shared machine.

Memory, by device:
- CUDA: `torch.cuda.max_memory_allocated()` during one forward+backward, minus what was allocated before it
  (parameters, input): the true peak of the step.
- CPU: PyTorch's CPU allocator has no peak counter and `tracemalloc` does not see tensor storage, so the script
  reports the bytes autograd keeps for the backward, collected with `torch.autograd.graph.saved_tensors_hooks` and
  counted once per storage. These saved activations are what grows a layer's memory with the batch; parameters and
  optimizer state are the same for both layers and are not included.

Run: `python benchmarks/layer_speed.py [--hidden 768 4096] [--repeats 7] [--device cpu|cuda]`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

import peft_musclelora  # noqa: F401  (registers the tuner)
from peft_musclelora.layer import Linear as MuScleLoraLinear

DEFAULT_SHAPES = ("4x2", "9x1")  # (number of scales B) x (rank per scale r)


@dataclass
class Measurement:
    seconds: float
    memory_bytes: int


def make_layers(hidden: int, num_scales: int, rank: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """A LoRA layer of rank B*r and an MSLR layer of B scales x rank r around the same frozen base layer."""
    torch.manual_seed(0)
    base = nn.Linear(hidden, hidden).to(device).requires_grad_(False)
    total_rank = num_scales * rank
    lora_config = LoraConfig(r=total_rank, lora_alpha=total_rank, init_lora_weights=False)
    lora = LoraLinear(base, "default", config=lora_config, r=total_rank, lora_alpha=total_rank)
    mslr = MuScleLoraLinear(
        copy.deepcopy(base),
        "default",
        r=rank,
        lora_alpha=rank,
        scales=[float(k) for k in range(1, num_scales + 1)],
        init_weights=False,
    )
    return lora.to(device), mslr.to(device)


class ZeroBase(nn.Module):
    """Stands in for the base layer in the adapter-only timing: no matmul, output of the right shape."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.out_features = base.out_features
        self.weight = base.weight  # for code that reads the base layer's dtype or device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def adapter_only(layer: nn.Module) -> nn.Module:
    stub = copy.copy(layer)
    stub._modules = dict(layer._modules)
    stub._modules["base_layer"] = ZeroBase(layer.base_layer)
    return stub


def step(layer: nn.Module, x: torch.Tensor) -> None:
    layer(x).sum().backward()
    x.grad = None
    for param in layer.parameters():
        param.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(layer: nn.Module, x: torch.Tensor) -> float:
    synchronize(x.device)
    start = time.perf_counter()
    step(layer, x)
    synchronize(x.device)
    return time.perf_counter() - start


def saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one forward pass."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = layer(x)
    output.sum().backward()
    step(layer, x)  # clear grads
    # Parameters are stored whether or not there is a backward; count only activations.
    parameter_storages = {param.untyped_storage().data_ptr() for param in layer.parameters()}
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in parameter_storages)


def cuda_peak_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    step(layer, x)
    synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - before


def measure_pair(layers: dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int) -> dict[str, Measurement]:
    for _ in range(warmup):
        for layer in layers.values():
            step(layer, x)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(time_step(layer, x))
    memory: Callable[[nn.Module, torch.Tensor], int] = (
        cuda_peak_bytes if x.device.type == "cuda" else saved_activation_bytes
    )
    return {name: Measurement(statistics.median(times[name]), memory(layer, x)) for name, layer in layers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 4096], help="Layer widths to test.")
    parser.add_argument("--tokens", type=int, default=2048, help="Rows of the input (batch * sequence length).")
    parser.add_argument("--repeats", type=int, default=7, help="Timed iterations per layer (the median is kept).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed iterations per layer before timing.")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxR pairs, e.g. 4x2 9x1.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's).")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    memory_kind = "CUDA peak allocated" if device.type == "cuda" else "saved activations"
    print(
        f"device={device} threads={torch.get_num_threads()} tokens={args.tokens} repeats={args.repeats} "
        f"torch={torch.__version__}; memory = {memory_kind}; time = median of forward+backward"
    )
    header = (
        f"{'hidden':>6} {'B':>2} {'r':>2} {'B*r':>3} | {'LoRA ms':>9} {'MSLR ms':>9} {'time x':>7} | "
        f"{'LoRA MiB':>9} {'MSLR MiB':>9} {'mem x':>6} | adapter only: {'LoRA ms':>8} {'MSLR ms':>8} {'time x':>7}"
    )
    print(header)
    print("-" * len(header))
    for hidden in args.hidden:
        for shape in args.shapes:
            num_scales, rank = (int(part) for part in shape.split("x"))
            lora, mslr = make_layers(hidden, num_scales, rank, device)
            generator = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(args.tokens, hidden, device=device, generator=generator, requires_grad=True)
            result = measure_pair({"lora": lora, "mslr": mslr}, x, args.warmup, args.repeats)
            lora_m, mslr_m = result["lora"], result["mslr"]
            stubs = measure_pair(
                {"lora": adapter_only(lora), "mslr": adapter_only(mslr)}, x, args.warmup, args.repeats
            )
            lora_a, mslr_a = stubs["lora"].seconds, stubs["mslr"].seconds
            print(
                f"{hidden:>6} {num_scales:>2} {rank:>2} {num_scales * rank:>3} | "
                f"{lora_m.seconds * 1e3:>9.2f} {mslr_m.seconds * 1e3:>9.2f} {mslr_m.seconds / lora_m.seconds:>7.3f} | "
                f"{lora_m.memory_bytes / 2**20:>9.2f} {mslr_m.memory_bytes / 2**20:>9.2f} "
                f"{mslr_m.memory_bytes / lora_m.memory_bytes:>6.3f} | "
                f"{'':>13} {lora_a * 1e3:>8.2f} {mslr_a * 1e3:>8.2f} {mslr_a / lora_a:>7.3f}"
            )


if __name__ == "__main__":
    main()
