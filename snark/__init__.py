"""Snark."""
