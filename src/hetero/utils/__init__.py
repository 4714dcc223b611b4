"""Task utilities: rank-aware logging, instantiation from config, run files."""
