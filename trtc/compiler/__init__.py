"""The build stage: checkpoint -> engine directory (kernel-ready weights, build config, tactics)."""
