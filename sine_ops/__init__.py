"""SINE math in plain torch: adapters, positional grid, crops, guidance mix, training step.

Nothing in this package imports ComfyUI; the nodes pass ComfyUI objects in through small protocols.
"""
