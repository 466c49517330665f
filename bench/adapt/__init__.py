"""The adaptation study: SmolLM2-135M converted to a BD3-LM at L'=4 and fine-tuned on CPU (README.md in this folder).

`python -m bench.adapt` runs it; `bench.adapt.measures` holds the measurements, `bench.adapt.study` the stages and
`bench.adapt.report` the tables and plots.
"""
