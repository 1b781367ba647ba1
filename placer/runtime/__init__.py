"""placer.runtime: running placed models.

`apply(model, plan)` returns a `PlacedModule` (placed.py), an ordinary nn.Module that
runs the plan's chunks (chunks.py) on per-device workers (executor.py); `measure`
times whole training steps of a placement (timing.py).
"""

from placer.runtime.chunks import Chunk
from placer.runtime.executor import ChunkEvent
from placer.runtime.placed import PlacedModule, apply

__all__ = ["apply", "PlacedModule", "Chunk", "ChunkEvent"]

# Last: timing builds on apply. `placer.runtime.measure` is the function from here on.
from placer.runtime.timing import Measurement, measure, measure_eager  # noqa: E402

__all__ += ["Measurement", "measure", "measure_eager"]
