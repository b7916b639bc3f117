"""Pure torch math shared by every sampler (no diffusers import)."""
