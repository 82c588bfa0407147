"""Reading trained adapters: rank spectra, effective rank, truncation, subspace similarity (spectrum.py)."""
