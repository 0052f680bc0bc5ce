"""Weight conversion between star_jax and the reference / Hugging Face layouts.

Modules, by job:
  table          the mapping-table machinery (transforms, entries, `load_params`); imports no other
                 convert module
  decoder_table, vision_table, vq_table, star_table
                 one mapping table per model part (star_table composes the whole STAR)
  tensor_io      safetensors read / write / streaming write, `torch.load(weights_only=True)` reader
  hf_config      Hugging Face config.json read, checked and written
  hf             Hugging Face directory -> standalone decoder / vision tower / VLM
  vq_io          standalone VQ weights <-> `VQModel`
  stage_reader   a stage checkpoint read tensor by tensor
  export         stage -> reference STAR file or Hugging Face directory
  importer       reference STAR file (+ HF directory + VQ) -> a stage directory
  verify         exports compared with PyTorch
"""

from star_jax.convert.hf import load_hf_decoder, load_hf_vlm

__all__ = ["load_hf_decoder", "load_hf_vlm"]
