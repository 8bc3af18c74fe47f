"""Recovery: actions that repair a run in place, applied in the training thread at step boundaries."""
