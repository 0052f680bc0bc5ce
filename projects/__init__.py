"""Projects built on star_jax (big_vision `proj/` style): each folder is importable as
`star_jax.projects.<name>`, registers its stages and data sources when a config names it in
`config.imports`, and keeps its experiments, configs and log beside its code. The core never imports
a project."""
