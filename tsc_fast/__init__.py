"""tsc_fast."""
