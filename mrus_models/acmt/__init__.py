"""mrus_models.acmt: anatomically coherent modality translation (ACMT) of MR and US volumes
through a Schrödinger bridge into one intermediate modality."""
