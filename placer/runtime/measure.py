"""Moved to placer.runtime.timing (the module no longer shares its name with the
`measure` function); this re-export goes once every import names timing."""

from placer.runtime.timing import Measurement, measure, measure_eager, measure_placement  # noqa: F401
