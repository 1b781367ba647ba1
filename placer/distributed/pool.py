"""Moved to placer.runtime.pool (it uses multiprocessing, not torch.distributed); this
re-export goes once every import names the new place."""

from placer.runtime.pool import MeasurementPool, WorkerStartError, worker_device_sets  # noqa: F401
