"""Hydra config tree of fedkd-sim. Importing it registers the typed schema it builds on."""

from federation.hydra_schema import register_configs

register_configs()
