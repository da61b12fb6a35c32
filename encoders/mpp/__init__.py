"""MPP physics surrogates (McCabe et al.): shared field embedding, RevIN, axial-attention AViT.

Modules, one job each:
- `solvers`  small numpy PDE solvers for the built-in data
- `synth`    built-in data: solver trajectories written as The Well data sets (`foundation synth mpp`)
- `well`     The Well HDF5 schema: writer, reader and stats.yaml
- `pdebench` PDEBench 2-D HDF5 layouts: reader (and small writers for tests and demos)
- `sources`  open any supported file as a windowable trajectory source
- `prepare`  native files -> shards of trajectory windows
- `collate`  windows -> mixed batches over the union of their fields, in loader workers
- `model`    the AViT and its parts
- `loss`     the training loss (MSE normalised per sample and field)
- `metrics`  The Well's NRMSE/VRMSE, for evaluation and training logs
- `finetune` vocabulary expansion and freezing presets
- `evaluate` one-step and autoregressive rollout errors of a checkpoint, with plots
- `convert`  released reference checkpoints -> our AViT
- `family`   the `Family` glue the trainer and CLI use
"""
