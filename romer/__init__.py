"""romer package."""
