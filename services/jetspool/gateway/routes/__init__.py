"""Route handlers, one module per surface: OpenFaaS dialect, fal queue dialect, administration."""
