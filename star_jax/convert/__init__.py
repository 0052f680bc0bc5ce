"""Weight conversion: one mapping table (mapping.py), Hugging Face import (hf.py, hf_vision.py),
tensor files without pickles (checkpoint_files.py)."""


def load_hf_decoder(path: str, **kwargs):
    """Loads a local Hugging Face Qwen2 / Qwen2.5-VL directory's text decoder; see `hf.load_hf_decoder`."""
    from star_jax.convert import hf

    return hf.load_hf_decoder(path, **kwargs)


def load_hf_vlm(path: str, **kwargs):
    """Loads a local Hugging Face Qwen2.5-VL directory (vision tower + decoder); see `hf_vision.load_hf_vlm`."""
    from star_jax.convert import hf_vision

    return hf_vision.load_hf_vlm(path, **kwargs)
