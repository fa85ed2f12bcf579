"""dedn: DEDN (Rao et al., IJCAI 2024) and other generalized zero-shot families on Ray Train, tracked in MLflow.

Layout by concern (docs/design.md): `data` (class side, the Parquet feature dataset, reader),
`nn` (shared attention and loss blocks), `families` (DEDN, MSDN and the interface a new family
implements), `training` (the loop, its per-epoch report and sinks, the one Ray Train driver),
`tracking` (every MLflow call), `tuning` (Ray Tune sweeps), `analysis` (ablations, comparison,
heat maps), `inference` (the Predictor and the model files). `config`, `protocol`, `metrics`,
`checkpoint`, `errors`, `atomic` and the small shared modules (`config_sections`, `home`,
`provenance`, `procs`, `seeds`, `accel`, `cli`) are shared by all; the layers they form are
docs/design.md#layers, checked by `make lint`.
Nothing is imported here: importing a subpackage does not pull in torch, Ray or MLflow it does not need.
"""
