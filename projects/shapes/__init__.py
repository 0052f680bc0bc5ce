"""The shapes-world project: the staged demo (every STAR stage on the procedural shapes world, then
exact evaluation), its experiments (a ViT pre-training stage, understanding-data mixtures, a tower
probe) and their log. See README.md beside this file."""
