"""The Ray Train machinery stages 1 and 3 share: batch plan, step loop, sharding, checkpoints."""
