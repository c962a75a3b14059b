"""Pure tensor code of secateurs: Hessians, the SparseGPT solve, N:M masks, baselines, the layer-by-layer
driver and perplexity. No files, no network, no settings; the device follows the inputs."""
