"""Ray Train for both model stages: the job (driver), the per-worker loop, its config,
checkpoints, the DDP backend bound to the node's address, and stage-2 latent pairs."""
