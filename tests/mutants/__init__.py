"""Curated mutants: small, plausible breaks of the production code that the
fast tests of their area must catch (``make mutants``; issue 11)."""
