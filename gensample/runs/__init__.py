"""Run glue: how a method becomes a `gensample run --sampler NAME` entry.

One module per method: its CLI / API options (``Option``), the function that draws one batch from a
``LoadedModel`` (``fn(model, opts, seeds, ctx) -> SampleBatch``) and the ``register(SamplerSpec)``
call. The method's math and its diffusers scheduler stay in ``gensample/samplers/<method>.py``,
which imports nothing from here; ``samplers.registry.discover()`` imports these modules too.
"""
