"""memplan configuration: Hydra YAML presets and the typed dataclass schemas they must satisfy.

This package sits at the bottom of the dependency graph (everything may import it; it imports
only OmegaConf). Hydra itself is used only by launch/, which composes the YAML files here.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
"""Directory holding config.yaml and the group folders (model/, cluster/, ...)."""
