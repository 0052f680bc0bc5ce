"""Compile-only checks for TPU slices (`star-jax aot`), run on any machine with the libtpu wheel.

topology  slice names users type (`v5p-128`, `v6e-64`, ...) -> compile-only TPU devices,
          the compiler's HBM per device, the chip's bf16 peak
compile   the trainer's jitted step compiled for a slice from abstract state: memory per
          device, FLOPs, estimated step time; the largest per-device batch that fits
"""
