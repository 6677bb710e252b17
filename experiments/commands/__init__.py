"""One module per CLI area; each registers its commands on :data:`experiments.app.app`."""
