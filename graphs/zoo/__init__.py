"""The benchmark zoo: the paper's three models and a transformer, each at a small size
for tests and quick runs, at a medium size whose operations are large enough for
several CPU devices to pay off (the benchmarks on a CPU host), and at the paper's size.

`zoo:NAME[:SIZE]` names one of these as a workload (`workload_module`). Every module
follows the workload-file contract with a `size` argument added: `build_model(size)`,
`example_inputs(size)` (one training batch, drawn from torch's global generator, so
deterministic under `torch.manual_seed`), `loss_fn(output, *inputs)`, and
`expert_placement(module_path, n_devices, size)` (the paper's human expert: a device
index, or None for a module path it does not cover, whose ops go beside their
producer). Each module's `SIZES` lists its sizes; `small` and `paper` always exist.

| name | size | what | source |
| --- | --- | --- | --- |
| rnnlm | small | 2-layer LSTM LM, hidden 64, vocab 1000, 20 steps, batch 8 | scaled down |
| rnnlm | medium | 2-layer LSTM LM, hidden 512, vocab 2000, 20 steps, batch 32 | large enough ops for CPU devices to run in parallel |
| rnnlm | paper | 2-layer LSTM LM, hidden 2048, vocab 10k, 20 steps, batch 64 | Mirhoseini et al. 2017 (vocab: our assumption, PTB) |
| nmt | small | 2+2-layer LSTM encoder-decoder with attention, hidden 64, 10+10 steps, batch 8 | scaled down |
| nmt | medium | 2+2 layers, hidden 384, vocab 2000, 16+16 steps, batch 32 | the default workload of `placer optimize` |
| nmt | paper | 2+2 layers, hidden 1024, vocab 32k, 50+50 steps, batch 128 | Mirhoseini et al. 2017 (lengths, vocab: our assumptions) |
| nmt | paper4 | 4+4 layers, otherwise as paper, batch 64 | Mirhoseini et al. 2018 (hierarchical planner) |
| inception_v3 | small | full architecture, channels x 1/4, 75x75 images, batch 2 | scaled down |
| inception_v3 | medium | full architecture, channels x 1/2, 139x139 images, batch 4 | |
| inception_v3 | paper | Inception-V3 (no aux head), 299x299 images, batch 32 | Mirhoseini et al. 2017; Szegedy et al. 2016 |
| transformer | small | GPT decoder, 2 layers, width 64, seq 32, batch 4 | scaled down |
| transformer | medium | GPT decoder, 4 layers, width 256, seq 128, batch 8 | |
| transformer | paper | GPT-2 small shape (12 layers, width 768), seq 512, batch 8 | not in the paper: a modern reference |
| mlp | small | 8 blocks of Linear(64)-LayerNorm-GELU, 10 classes, batch 32 | a chain for pipelining |
| mlp | medium | 16 blocks of width 1024, 64 classes, batch 256 (~0.3 s a step on one core) | |
| mlp | paper | 32 blocks of width 4096, 1000 classes, batch 1024 | GPipe-scale stand-in |
| gpt | small | GPT decoder, 4 layers, width 64, seq 32, batch 8, vocab 256 | untied head |
| gpt | medium | 8 layers, width 192, seq 64, batch 16, vocab 1024 (~0.35 s a step on one core) | micro-batches of whole sequences |
| gpt | paper | GPT-2 small's shape, seq 256, batch 32 | reference |

Expert placements: rnnlm and nmt put LSTM layer i on device i mod n with the
embeddings beside layer 0 and attention and softmax beside the last layer (GNMT's
layout, Wu et al. 2016); inception_v3 deals each block's towers over the devices,
stem and classifier on device 0; transformer and gpt split their blocks into
contiguous, even runs; mlp likewise its blocks.
"""

from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace

from graphs.zoo import gpt, inception_v3, mlp, nmt, rnnlm, transformer
from graphs.errors import WorkloadError

ZOO: dict[str, ModuleType] = {
    "rnnlm": rnnlm,
    "nmt": nmt,
    "inception_v3": inception_v3,
    "transformer": transformer,
    "mlp": mlp,
    "gpt": gpt,
}
SIZES = ("small", "medium", "paper")


def workload_module(name: str, size: str = "small") -> SimpleNamespace:
    """Zoo model `name` at `size` as a workload file would define it: `build_model()`,
    `example_inputs()`, `loss_fn`, `expert_placement(module_path, n_devices)`, with the
    size bound. Raises WorkloadError for an unknown name or size."""
    if name not in ZOO:
        raise WorkloadError(f"zoo:{name}: no such zoo model (known: {', '.join(ZOO)})")
    module = ZOO[name]
    if size not in module.SIZES:
        raise WorkloadError(f"zoo:{name}:{size}: no such size (known: {', '.join(module.SIZES)})")
    return SimpleNamespace(
        build_model=functools.partial(module.build_model, size),
        example_inputs=functools.partial(module.example_inputs, size),
        loss_fn=module.loss_fn,
        expert_placement=functools.partial(module.expert_placement, size=size),
    )
