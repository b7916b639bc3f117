"""Training loops for the small embedded models (the shipped weights come from these)."""
