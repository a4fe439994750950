"""Sidemesh plugins_sdk (under construction)."""
