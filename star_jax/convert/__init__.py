"""Weight conversion: one mapping table (mapping.py), Hugging Face import (hf.py), tensor files."""


def load_hf_decoder(path: str, **kwargs):
    """Loads a local Hugging Face Qwen2 / Qwen2.5-VL directory's text decoder; see `hf.load_hf_decoder`."""
    from star_jax.convert import hf

    return hf.load_hf_decoder(path, **kwargs)
