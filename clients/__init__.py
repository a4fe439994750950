"""Sidemesh clients (under construction)."""
