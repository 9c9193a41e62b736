"""One module per pipeline stage, each with an entry point ``run(cfg: RunConfig) -> Path``."""
