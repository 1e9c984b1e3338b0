"""The memplan command line: Hydra composition, torchrun launch, cluster job scripts."""
