"""gensample: research-grade diffusion samplers that plug into Hugging Face diffusers."""

__version__ = "0.1.0"


def run(sampler=None, model=None, **options):
    """Draw samples; see ``gensample.api.run`` (every CLI option is a keyword)."""
    from .api import run as _run

    return _run(sampler=sampler, model=model, **options)


__all__ = ["run", "__version__"]
