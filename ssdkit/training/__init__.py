"""Training: the blockwise loss, the train state and jitted step with its optimiser defaults, train-state
checkpoints, and data packing. The public names are re-exported from ``ssdkit``."""
