"""MPP physics surrogates (McCabe et al.): shared field embedding, RevIN, axial-attention AViT.

Modules, one job each:
- `solvers`: small numpy PDE solvers behind `foundation synth mpp`;
- `well`: The Well HDF5 schema — writer, reader and stats.yaml;
- `pdebench`: PDEBench 2-D HDF5 layouts — reader (and small writers for tests and demos);
- `sources`: open any supported file as a windowable trajectory source;
- `model`: the AViT and its parts; `metrics`: NRMSE/VRMSE and the training loss;
- `finetune`: vocabulary expansion and freezing presets; `rollout`: autoregressive evaluation;
- `family`: the `Family` glue the trainer and CLI use.
"""
