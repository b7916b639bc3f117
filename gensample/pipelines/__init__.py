"""DiffusionPipeline subclasses, one per method family (thin: the math lives in samplers/)."""
