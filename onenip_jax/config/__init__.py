"""The configuration: every default (`base`), loading and overrides (`loading`), value checks (`checks`)."""
