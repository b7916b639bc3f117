"""One module per sampling method: its parameters, math, loop and Python entry points.

The diffusers scheduler faces live in ``gensample.schedulers`` (one file per method, same name).

Modules register themselves in ``registry.SAMPLERS`` on import (``registry.discover()``).
"""
