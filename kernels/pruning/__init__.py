"""Pruning math: Hessians, the SparseGPT solve, the magnitude and Wanda baselines, the masked re-solve, and the
layer-by-layer driver that applies them to a model one decoder block at a time."""
