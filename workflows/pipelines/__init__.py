"""Ray pipelines: index (reference banks), train, evaluate, lodo; `resume` holds shard bookkeeping."""
