"""The config: every default (`base`), files and overrides (`loading`), value checks (`checks`)."""
