"""The paper's stack-depth and initialisation ablation on the shapes world (STAR_SPEC section 7)."""


def get_sweep():
    """List of override dicts: stack depth 1..4 (copied from the base's last layers) and random init."""
    runs = [{"config_arg": "size=shapes,stage=generation", "model.star.stack_layers": n} for n in (1, 2, 4)]
    runs.append({"config_arg": "size=shapes,stage=generation", "model.star.stack_init": "random"})
    return runs
