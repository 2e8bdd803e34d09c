"""toothseg learning side: the retrain job, training, the gate, metrics, pre-annotation passes and
the simulation; dataset tooling in `training.data`, operations (CLI, stack, status) in
`training.ops`."""
