"""Every benchmark (`fusionrank bench ...`): each prints one JSON object naming the machine it ran on. Kept light:
`python -m workers.bench.batch` replays saved features on a GPU box with numpy, torch and safetensors alone."""
