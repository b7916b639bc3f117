"""One module per sampling method: its math and its diffusers scheduler face.

Modules register themselves in ``registry.SAMPLERS`` on import (``registry.discover()``).
"""
