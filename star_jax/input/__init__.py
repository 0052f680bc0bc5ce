"""The input pipeline of every stage on Grain: records -> per-example arrays -> process-local batches.

  sources      where records come from: the shapes world, ArrayRecord directories, a project's
               registered source (`config.data.source`)
  examples     record -> the per-example arrays of a stage (`ExampleSpec`, `Prepare`, the builders
               a `stages.Stage` names)
  bad_records  bad records as counted skips, never crashes (`SkipBad`, `PipelineIterator`)
  pipeline     `make_iterator(config, split=, process_index=, process_count=)`: the whole pipeline

This package file imports nothing: `star_jax.stages` imports `input.examples`, and `input.pipeline`
imports `star_jax.stages`.
"""
