"""Ways of building or applying the update: init methods (INITS) and variants such as DoRA (VARIANTS)."""
