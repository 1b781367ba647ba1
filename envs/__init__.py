"""The step-time simulator, its calibration, and the Gymnasium placement environment.

Importing this package registers "placer/DevicePlacement-v0" (envs.env.PlacementEnv)
with Gymnasium.
"""

from gymnasium.envs.registration import register

register(id="placer/DevicePlacement-v0", entry_point="envs.env:PlacementEnv")
