"""noise_fit package."""
