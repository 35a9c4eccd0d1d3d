"""The memory/communication/speed planner: `plan` builds a Plan from a config, `report` prints it, `cli` is the
`python -m mythos_train plan` command; memory, activations, comm and hardware are its models."""
