"""Sidemesh sidecars (under construction)."""
