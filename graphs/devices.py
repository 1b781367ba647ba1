"""The devices a placement may use: parsing `--devices` and `--memory` (DESIGN.md).

`cuda:N` is a real GPU; `cpu` is the whole host; `cpu:0,cpu:1,...` are virtual CPU
devices, each a worker with its own share of the host's cores, so that two of them
really run concurrently; the command line numbers them cpu:0 to cpu:N-1
(check_numbering: a number names a worker, not a core).

`rankR:DEVICE` (e.g. `rank0:cuda:0,rank1:cuda:0`) gives a device an owner: the
torch.distributed rank whose process runs it (placer.distributed). Such a device may
live on another host, so it is not checked against this host's GPUs.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field

from graphs.errors import DeviceSpecError

_DEVICE_RE = re.compile(r"^(?:rank(\d+):)?(cpu|cuda)(?::(\d+))?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}


@dataclass(frozen=True)
class Link:
    """A one-way connection between two devices: time = latency + bytes / bandwidth."""

    latency_s: float
    bandwidth_Bps: float

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


# Nominal links before calibration. Virtual CPU devices share memory: a hand-off is
# a thread wake-up, not a copy. PCIe 4 x16 for host<->GPU; NVLink-class for GPU<->GPU.
DEFAULT_LINKS: dict[frozenset[str], Link] = {
    frozenset({"cpu"}): Link(latency_s=30e-6, bandwidth_Bps=1e12),
    frozenset({"cpu", "cuda"}): Link(latency_s=10e-6, bandwidth_Bps=12e9),
    frozenset({"cuda"}): Link(latency_s=10e-6, bandwidth_Bps=50e9),
}


@dataclass(frozen=True)
class Device:
    name: str  # as the user wrote it: "cpu", "cpu:1", "cuda:0", "rank1:cuda:0"
    kind: str  # "cpu" or "cuda": which profiled costs apply
    torch_device: str  # where its tensors live: "cpu" or "cuda:N"
    memory_bytes: int | None = None  # cap; None means the device's own limit
    threads: int = 1  # intra-op threads of its worker (CPU devices)
    rank: int | None = None  # the torch.distributed rank that owns it; None: this process

    @property
    def local_name(self) -> str:
        """The name without its owner: "rank1:cuda:0" -> "cuda:0"."""
        return self.name if self.rank is None else self.name.split(":", 1)[1]

    @property
    def is_virtual_cpu(self) -> bool:
        return is_virtual_cpu_name(self.name)


def is_virtual_cpu_name(name: str) -> bool:
    """Whether device `name` is a virtual CPU device (`cpu:k`, `rank1:cpu:k`): a share of
    the host's cores, not the whole host `cpu`."""
    match = _DEVICE_RE.match(name)
    return match is not None and match.group(2) == "cpu" and match.group(3) is not None


@dataclass(frozen=True)
class Cluster:
    devices: tuple[Device, ...]
    links: dict[frozenset[str], Link] = field(default_factory=lambda: dict(DEFAULT_LINKS))

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    @property
    def kinds(self) -> list[str]:
        """The distinct device kinds, in first-seen order."""
        return list(dict.fromkeys(d.kind for d in self.devices))

    def index(self, name: str) -> int:
        """The position of device `name`. Raises DeviceSpecError where the cluster lacks it."""
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise DeviceSpecError(f"device {name!r} is not in this cluster ({','.join(self.names)})")

    def link(self, a: int, b: int) -> Link:
        """The link from device a to device b (a != b)."""
        return self.links[frozenset({self.devices[a].kind, self.devices[b].kind})]

    def spec(self) -> str:
        """The `--devices` string that rebuilds this cluster."""
        return ",".join(self.names)


def format_size(nbytes: float | None) -> str:
    """Bytes for people, the inverse of `parse_size`: "512 B", "1.5 KiB", "30.0 MiB"; "-" for None."""
    if nbytes is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(nbytes, 1), 1024)), len(units) - 1)
    return f"{nbytes:.0f} B" if power == 0 else f"{nbytes / 1024**power:.1f} {units[power]}"


def parse_size(text: str) -> int:
    """'16GiB' -> 17179869184; '2GB' -> 2000000000; '512' -> 512.

    Raises
    ------
    DeviceSpecError : not a number of bytes with a known unit (B, KB, KiB, ... TiB).
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise DeviceSpecError(f"cannot read memory size {text!r}: write e.g. 16GiB, 512MiB or 2GB")
    number, unit = m.groups()
    unit = (unit or "").lower()
    if unit not in _UNITS:
        raise DeviceSpecError(f"unknown memory unit in {text!r}: use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)")
    return int(float(number) * _UNITS[unit])


def default_device_spec() -> str:
    """Every visible GPU plus the CPU; on a host without GPUs, two virtual CPU devices."""
    import torch  # imported where GPUs are counted: the CLI parses --devices before it imports torch (seconds)

    if torch.cuda.is_available():
        return ",".join([f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu"])
    return "cpu:0,cpu:1"


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_cluster(devices: str | None = None, memory: str | None = None) -> Cluster:
    """Build a Cluster from `--devices` and `--memory` strings (see module doc).

    Raises DeviceSpecError for a malformed string, a duplicate, a device this host
    lacks, mixing `cpu` with `cpu:N`, or a memory cap for a device not listed.
    """
    spec = devices if devices is not None else default_device_spec()
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise DeviceSpecError(f"no devices in {spec!r}: write e.g. cpu:0,cpu:1 or cuda:0,cpu")

    parsed = []
    for name in names:
        m = _DEVICE_RE.match(name)
        if not m:
            raise DeviceSpecError(f"cannot read device {name!r}: write cpu, cpu:N or cuda:N (or rankR:DEVICE)")
        parsed.append((name, m.group(2), None if m.group(3) is None else int(m.group(3)),
                       None if m.group(1) is None else int(m.group(1))))
    seen: dict[tuple, str] = {}
    for name, kind, idx, rank in parsed:
        # What the name denotes: `cuda` is cuda:0; each cpu name is its own (virtual) device.
        key = (rank, kind, 0 if kind == "cuda" and idx is None else idx)
        if key in seen:
            also = "" if seen[key] == name else f" (as {seen[key]!r} and {name!r})"
            raise DeviceSpecError(f"a device is listed twice in {spec!r}{also}")
        seen[key] = name
    owned = [rank is not None for *_, rank in parsed]
    if any(owned) and not all(owned):
        raise DeviceSpecError(f"give every device in {spec!r} an owner (rankR:DEVICE) or none")

    for owner in dict.fromkeys(rank for *_, rank in parsed):  # each rank's process is one host's share
        cpu_whole = [n for n, kind, idx, rank in parsed if kind == "cpu" and idx is None and rank == owner]
        cpu_virtual = [n for n, kind, idx, rank in parsed if kind == "cpu" and idx is not None and rank == owner]
        if cpu_whole and cpu_virtual:
            raise DeviceSpecError("use either the whole host `cpu` or virtual devices `cpu:N`, not both")
    for name, kind, idx, rank in parsed:
        if kind == "cuda" and rank is None:
            import torch  # as in default_device_spec

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = 0 if idx is None else idx
            if index >= count:
                raise DeviceSpecError(f"device {name!r} does not exist on this host ({count} CUDA device(s) visible): "
                                      f"name the devices it has, e.g. --devices cpu:0,cpu:1, or leave --devices out")

    cores = host_cores()
    virtual = sum(1 for _, kind, idx, rank in parsed if kind == "cpu" and idx is not None and rank is None)
    if virtual > cores:
        _warn_once(f"{virtual} virtual CPU devices on {cores} cores: they share cores, so they cannot all run at "
                   f"once; a plan over them runs slower here than on {virtual} cores, may be slower than the model "
                   f"run without placer, and plans measured here will not show what {virtual} devices could do "
                   f"(use at most {cores} cpu:N devices here, or make the plan on the host it will run on)")
    caps = parse_memory(memory, names)
    built = []
    for name, kind, idx, rank in parsed:
        virtual = sum(1 for _, k, i, r in parsed if k == "cpu" and i is not None and r == rank)
        torch_device = "cpu" if kind == "cpu" else f"cuda:{idx or 0}"
        threads = (max(1, cores // virtual) if virtual else cores) if kind == "cpu" else 1
        built.append(Device(name=name, kind=kind, torch_device=torch_device, memory_bytes=caps.get(name),
                            threads=threads, rank=rank))
    return Cluster(devices=tuple(built))


_WARNED: set[str] = set()  # the warnings this process has given (each is given once)


def _warn_once(message: str) -> None:
    """warnings.warn(message) the first time this process gives it: one command parses
    its devices several times (checks, problem, resume), and says so once."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def check_numbering(cluster: Cluster) -> None:
    """Refuse `--devices` whose virtual CPU devices are not numbered cpu:0 to cpu:N-1.

    A virtual CPU device's number names a worker, not a core: workers take their
    shares of the cores in the order listed, so `cpu:5` would be the second worker
    on the first free cores, whatever the 5 seems to promise. The command line asks
    for 0 to N-1, in any order and without gaps; the library accepts any numbers
    (a plan's devices are renamed at apply time, a single device measured alone keeps
    its name, and a rank's devices live in its own process).

    Raises
    ------
    DeviceSpecError : a gap or a number past N-1, naming the spec to write instead.
    """
    virtual = [d.name for d in cluster.devices if d.is_virtual_cpu and d.rank is None]
    if sorted(int(name.split(":")[1]) for name in virtual) != list(range(len(virtual))):
        expected = ",".join(f"cpu:{i}" for i in range(len(virtual)))
        fix = ("number a single device 0" if len(virtual) == 1 else
               f"number them cpu:0 to cpu:{len(virtual) - 1} without gaps")
        raise DeviceSpecError(f"virtual CPU device{'s' if len(virtual) > 1 else ''} {','.join(virtual)}: {fix}, "
                              f"e.g. {expected} (a number names a worker with its share of the cores, not a core)")


def parse_memory(memory: str | None, names: list[str]) -> dict[str, int]:
    """'cuda:0=16GiB,cpu:1=2GiB' -> {device name: bytes}. Raises DeviceSpecError for a
    malformed cap, a name that is not a listed device, or a device capped twice."""
    caps: dict[str, int] = {}
    if not memory:
        return caps
    for part in memory.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise DeviceSpecError(f"cannot read memory cap {part!r}: write DEVICE=SIZE, e.g. cuda:0=16GiB")
        name, size = (s.strip() for s in part.split("=", 1))
        if name not in names:
            raise DeviceSpecError(f"memory cap for {name!r}, which is not among the devices ({','.join(names)})")
        if name in caps:
            raise DeviceSpecError(f"{name!r} is capped twice in {memory!r}: give each device one cap")
        caps[name] = parse_size(size)
    return caps
